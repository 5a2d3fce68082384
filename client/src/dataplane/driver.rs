//! The thin driver: owns the TUN and the UDP socket and runs three OS threads around the core.
//!
//! - `ward-dp-tx`: TUN → [`Runs::handle_tun_packet`] → UDP (GSO super-packets from the TUN are
//!   split by tun-rs, the encrypted datagrams leave as UDP GSO messages); ICMP errors for
//!   destinations without a peer go back into the TUN. It reads the TUN under load only: at
//!   idle the receive thread waits for the TUN too and sends what it reads itself, so a
//!   packet and its reply are served by one thread and no wake-up crosses to the other core
//!   ([`TunOwner`] says who waits for the TUN and how it changes hands).
//! - `ward-dp-rx`: UDP (GRO) → address-discovery answers set aside by their first byte, the rest
//!   → [`Runs::handle_datagram`] (decrypt, source check, inbound
//!   filter at coordinator time = wall clock + [`Core::clock_offset_ms`]) → TUN (TCP/UDP segments
//!   coalesced by tun-rs's GRO table into one write per flow). After a quiet spell that a
//!   packet from the TUN ended, it polls without sleeping for the answer ([`ReplySpin`]).
//! - `ward-dp-timer`: [`Core::handle_timers`] every [`Core::timer_wait`] (the engine's
//!   `TIMER_INTERVAL`, shorter during a punch burst), the path MTUs of the
//!   destinations in use re-read from the kernel every [`REFRESH_INTERVAL`], idle flows swept
//!   now and then.
//!
//! The session loop is woken ([`Wake`]) for punch requests by the timer thread, and for
//! peers wanted on demand by whichever thread's batch recorded the want, right after that
//! batch ([`Core::take_want_signal`]: one atomic load per batch when there is none), so a
//! want reaches the coordinator without waiting for a timer.
//!
//! Each read is one [`Batch`], handled in [`Runs`]: a peer's session is locked once per run of
//! its packets (the whole read for a single bulk stream), not per packet. The receive thread
//! releases the run before it writes to the TUN in the middle of a batch.
//!
//! Datagrams the engine routes through a relay are split off every outbox after the UDP send
//! (which skips them) into the bounded relay queue (`relay`). Datagrams that arrive through a
//! relay come in on the daemon's relayed-receive thread in batches (every datagram the relay
//! connection has ready, [`Driver::handle_relayed`]), which decrypts them under its own batch
//! and writes them to the TUN itself, coalesced by its own GRO table like the receive thread's:
//! the TUN descriptor takes concurrent writes, and handing packets to the receive thread would
//! need a wake-up channel into its `poll` and a copy for no gain.
//!
//! Blocking threads rather than tokio tasks: the hot paths are syscall loops that gain nothing
//! from an executor, and two threads use the machine's two cores under load. Reads are
//! non-blocking; the threads wait in `poll`, which a stop interrupts through their eventfds.
//!
//! [`Batch`]: super::engine::Batch
//! [`Runs`]: super::engine::Runs
//! [`Runs::handle_tun_packet`]: super::engine::Runs::handle_tun_packet
//! [`Runs::handle_datagram`]: super::engine::Runs::handle_datagram

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tun_rs::{ExpandBuffer, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::discovery::{is_discovery_byte, Inbox};
use super::engine::{Core, Outbox, RelayId, Source};
use super::pmtu::REFRESH_INTERVAL;
use super::relay::RelayQueue;
use super::tun::{TunDevice, TunParams};
use super::udp::{poll_fds, pollfd, RecvBatch, SendScratch, UdpSocket};
use super::{DataPlaneConfig, TUN_MTU};

/// How long a blocked wait lasts before the thread checks the stop flag on its own (a stop
/// also wakes the receive and send threads through their eventfds at once): long, so that an
/// idle device's data plane does not wake its CPU ten times a second.
const STOP_CHECK: Duration = Duration::from_secs(1);
/// Output buffer per segment read from the TUN (the MTU is 1420). The 128 of them are zeroed,
/// so all their pages are resident: 2 KiB each is 256 KiB.
const TUN_SEGMENT_BUF: usize = 2048;
const _: () = assert!(TUN_SEGMENT_BUF >= TUN_MTU as usize);
/// TUN reads (each possibly a 64 KiB super-packet) gathered before one UDP flush.
const TUN_READS_PER_FLUSH: usize = 4;
/// UDP messages per recvmmsg (each up to 64 KiB with GRO, so up to ~350 datagrams a call).
const UDP_RECV_SLOTS: usize = 8;
/// Decrypted packets gathered before one GRO-coalesced TUN write: one full 64 KiB GRO packet
/// (48 segments of a 1368-byte MSS); a larger batch does not make larger TUN writes.
const TUN_WRITE_BATCH: usize = 48;
/// Room promised to tun-rs for one coalesced packet: the virtio-net header plus up to 64 KiB.
const TUN_WRITE_BUF: usize = VIRTIO_NET_HDR_LEN + 65536;
/// What a buffer holds between writes: one decrypted packet (the MTU is 1420; a larger
/// datagram makes the buffer grow for that packet).
const TUN_PACKET_BUF: usize = VIRTIO_NET_HDR_LEN + 2048;
/// The same for packets that came through a relay (a batch of them arrives together): one
/// full GRO packet, like [`TUN_WRITE_BATCH`].
const RELAYED_TUN_BATCH: usize = TUN_WRITE_BATCH;

/// A buffer for one decrypted packet on its way to the TUN. tun-rs coalesces a flow's
/// segments into the buffer of its first one, and only into a buffer whose capacity holds the
/// result (see the test below); this one reports room for a full 64 KiB write but holds one
/// packet's worth. When tun-rs appends to it, it swaps in a 64 KiB buffer lent by its thread
/// ([`LARGE`]) and hands it back after the write ([`TunBuf::release`]). So a thread touches
/// only as many 64 KiB buffers as one batch had coalesced flows, where fixed 64 KiB buffers
/// left every buffer's pages resident once any write had gone through it (48 × 64 KiB =
/// 3 MiB), and growing and shrinking each buffer in place spread the writes over ever new
/// malloc chunks.
#[derive(Debug)]
struct TunBuf {
    /// The bytes tun-rs sees.
    buf: Vec<u8>,
    /// While `buf` is a lent 64 KiB buffer: the one-packet buffer it stands in for.
    parked: Option<Vec<u8>>,
}

thread_local! {
    /// 64 KiB buffers lent to this thread's [`TunBuf`]s for coalesced writes, back after each
    /// write; at most [`LARGE_KEPT`] are kept.
    static LARGE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// 64 KiB buffers a thread keeps for coalesced writes (one per flow coalesced in a batch;
/// a batch with more flows allocates the rest and frees them after the write).
const LARGE_KEPT: usize = 8;

impl TunBuf {
    fn new() -> TunBuf {
        TunBuf {
            buf: Vec::with_capacity(TUN_PACKET_BUF),
            parked: None,
        }
    }

    /// A buffer holding `packet` after a zeroed virtio-net header.
    fn with_packet(packet: &[u8]) -> TunBuf {
        let mut b = TunBuf::new();
        b.buf.resize(VIRTIO_NET_HDR_LEN, 0);
        b.buf.extend_from_slice(packet);
        b
    }

    /// Makes room for `extra` more bytes: a lent 64 KiB buffer holding the bytes so far, or
    /// (past the promised room, which tun-rs never asks for) a larger allocation.
    fn reserve_for(&mut self, extra: usize) {
        let needed = self.buf.len().saturating_add(extra);
        if needed <= self.buf.capacity() {
            return;
        }
        if needed <= TUN_WRITE_BUF && self.parked.is_none() {
            let mut large = LARGE
                .with(|l| l.borrow_mut().pop())
                .unwrap_or_else(|| Vec::with_capacity(TUN_WRITE_BUF));
            large.clear();
            large.extend_from_slice(&self.buf);
            self.parked = Some(std::mem::replace(&mut self.buf, large));
        } else {
            self.buf.reserve_exact(needed - self.buf.len());
        }
    }

    /// After the TUN write: back to one packet's room, the lent buffer returned.
    fn release(&mut self) {
        if let Some(small) = self.parked.take() {
            let mut large = std::mem::replace(&mut self.buf, small);
            large.clear();
            LARGE.with(|l| {
                let mut l = l.borrow_mut();
                if l.len() < LARGE_KEPT {
                    l.push(large);
                }
            });
        } else if self.buf.capacity() > TUN_PACKET_BUF {
            self.buf.clear();
            self.buf.shrink_to(TUN_PACKET_BUF);
        }
    }
}

impl std::ops::Deref for TunBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for TunBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for TunBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for TunBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl ExpandBuffer for TunBuf {
    fn buf_capacity(&self) -> usize {
        self.buf.capacity().max(TUN_WRITE_BUF)
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.reserve_for(new_len.saturating_sub(self.buf.len()));
        self.buf.resize(new_len, value);
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        self.reserve_for(src.len());
        self.buf.extend_from_slice(src);
    }
}

/// Who the data-plane threads wake in the session loop.
pub(crate) struct Wake {
    /// Punch requests are waiting ([`Core::take_punch_requests`]).
    pub(crate) punch: Arc<tokio::sync::Notify>,
    /// Peers are wanted ([`Core::take_wants`]).
    pub(crate) wants: Arc<tokio::sync::Notify>,
}

pub(crate) struct Driver {
    core: Arc<Core>,
    udp: Arc<UdpSocket>,
    tun: Arc<TunDevice>,
    relay: Arc<RelayQueue>,
    /// Buffers for datagrams arriving through relays (one caller at a time).
    relayed_in: Mutex<RelayedIn>,
    /// The TUN's reader, for a turn after a relayed packet's write (see
    /// [`TunSide::rx_turn`]).
    side: Arc<TunSide>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tun_name: String,
    local_port: u16,
}

impl Driver {
    /// Creates the TUN and socket and starts the threads. Blocking (runs `ip`).
    pub(crate) fn start(
        cfg: &DataPlaneConfig,
        core: Arc<Core>,
        discovery: Arc<Inbox>,
        relay: Arc<RelayQueue>,
        wake: Wake,
    ) -> anyhow::Result<Driver> {
        let udp = Arc::new(
            UdpSocket::bind(cfg.port, core.path_mtus().clone())
                .with_context(|| format!("binding UDP port {}", cfg.port))?,
        );
        let local_port = udp.local_port().context("reading UDP port")?;
        let tun = Arc::new(TunDevice::create(&TunParams {
            name: &cfg.tun_name,
            mtu: TUN_MTU,
            ipv4: cfg.ipv4,
            ipv6: cfg.ipv6,
            v6_prefix: cfg.v6_prefix,
        })?);
        tracing::info!(
            port = local_port,
            udp_gro = udp.gro_enabled(),
            udp_gso = udp.gso_enabled(),
            tun_offload = tun.offload,
            "data plane started"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let side = Arc::new(
            TunSide::new(wake.wants.clone()).context("creating the data plane's eventfds")?,
        );
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .with_context(|| format!("spawning {name}"))
        };
        let result = (|| {
            threads.push(spawn("ward-dp-tx", {
                let (core, tun, udp, stop) = (core.clone(), tun.clone(), udp.clone(), stop.clone());
                let (relay, side) = (relay.clone(), side.clone());
                Box::new(move || tx_loop(&core, &tun, &udp, &relay, &side, &stop))
            })?);
            threads.push(spawn("ward-dp-rx", {
                let (core, tun, udp, stop) = (core.clone(), tun.clone(), udp.clone(), stop.clone());
                let (discovery, relay, side) = (discovery.clone(), relay.clone(), side.clone());
                Box::new(move || rx_loop(&core, &tun, &udp, &relay, &side, &discovery, &stop))
            })?);
            threads.push(spawn("ward-dp-timer", {
                let (core, udp, stop) = (core.clone(), udp.clone(), stop.clone());
                let relay = relay.clone();
                Box::new(move || timer_loop(&core, &udp, &relay, &wake, &stop))
            })?);
            anyhow::Ok(())
        })();
        let driver = Driver {
            core,
            udp,
            tun,
            relay,
            relayed_in: Mutex::new(RelayedIn::default()),
            side,
            stop,
            threads,
            tun_name: cfg.tun_name.clone(),
            local_port,
        };
        if let Err(e) = result {
            driver.shutdown();
            return Err(e);
        }
        Ok(driver)
    }

    pub(crate) fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Sends datagrams produced outside the threads (by `set_peers`, `refuse`…) and writes
    /// their TUN packets (ICMP errors); wakes the session loop if that recorded a want.
    pub(crate) fn send(&self, out: &Outbox) {
        self.udp.send_outbox(out, &mut SendScratch::default());
        self.relay.push(&self.core, out);
        if !out.tun_packets().is_empty() {
            // The relayed path's GRO table, rather than one more (a table is 1.7 MiB).
            let mut guard = self
                .relayed_in
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let RelayedIn { gro, errors, .. } = &mut *guard;
            let mut bufs: Vec<TunBuf> = out
                .tun_packets()
                .iter()
                .map(|p| TunBuf::with_packet(p))
                .collect();
            write_tun(&self.tun, gro, &mut bufs, errors);
        }
        self.side.signal_wants(&self.core);
    }

    /// Datagrams that arrived through relay `relay`, `(from device, datagram)` in arrival
    /// order: decrypted and checked by the core under one batch, the packets written to the
    /// TUN in GRO-coalesced writes (one per flow and [`RELAYED_TUN_BATCH`] packets), replies
    /// sent (UDP or relay queue).
    pub(crate) fn handle_relayed<'d>(
        &self,
        relay: RelayId,
        datagrams: impl IntoIterator<Item = (u64, &'d [u8])>,
    ) {
        let mut guard = self
            .relayed_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let RelayedIn {
            bufs,
            out,
            scratch,
            gro,
            errors,
        } = &mut *guard;
        let now = Instant::now();
        let coordinator_now_ms = ward_runtime::now_ms().saturating_add(self.core.clock_offset_ms());
        let mut filled = 0;
        let mut wrote = false;
        {
            let mut batch = self.core.batch();
            let mut runs = batch.runs();
            for (from, datagram) in datagrams {
                if filled == bufs.len() {
                    bufs.push(TunBuf::new());
                }
                let buf = &mut bufs[filled];
                buf.clear();
                buf.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
                if let Some(n) = runs.handle_datagram(
                    Source::Relay { relay, from },
                    datagram,
                    now,
                    coordinator_now_ms,
                    &mut buf[VIRTIO_NET_HDR_LEN..],
                    out,
                ) {
                    buf.truncate(VIRTIO_NET_HDR_LEN + n);
                    filled += 1;
                    if filled == RELAYED_TUN_BATCH {
                        runs.release();
                        write_tun(&self.tun, gro, &mut bufs[..filled], errors);
                        filled = 0;
                        wrote = true;
                    }
                }
            }
        }
        wrote |= filled > 0;
        write_tun(&self.tun, gro, &mut bufs[..filled], errors);
        if !out.is_empty() {
            self.udp.send_outbox(out, scratch);
            self.relay.push(&self.core, out);
            out.clear();
        }
        drop(guard);
        self.side.signal_wants(&self.core);
        if wrote {
            self.side
                .rx_turn(&self.core, &self.tun, &self.udp, &self.relay);
        }
    }

    pub(crate) fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.side.owner.wake_rx.signal();
        self.side.owner.wake_tx.signal();
    }

    /// Stops and joins the threads (they and this driver hold the TUN descriptor), then makes sure the
    /// interface is gone.
    pub(crate) fn shutdown(mut self) {
        self.signal_stop();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!("a data plane thread panicked");
            }
        }
        TunDevice::remove(&self.tun_name);
        tracing::info!(tun = %self.tun_name, counters = ?self.core.counters(), "data plane stopped");
    }
}

/// What [`Driver::handle_relayed`] reuses from one datagram to the next.
#[derive(Default)]
struct RelayedIn {
    /// Decrypted packets waiting for one TUN write; grows to [`RELAYED_TUN_BATCH`] at most.
    bufs: Vec<TunBuf>,
    out: Outbox,
    scratch: SendScratch,
    gro: LazyGro,
    errors: LogLimiter,
}

/// tun-rs's GRO state, made on the first TUN write that needs it. A table preallocates pools
/// for 128 flows (1.7 MiB in 256 allocations, of which malloc's chunk headers alone touch
/// about 1 MiB), which a path that seldom or never writes (ICMP replies from the send thread,
/// packets that came through a relay) should not hold from the start.
#[derive(Default)]
struct LazyGro(Option<GROTable>);

impl LazyGro {
    fn get(&mut self) -> &mut GROTable {
        self.0.get_or_insert_with(GROTable::default)
    }
}

/// What reads the TUN: the buffers and scratch of the send path, behind a lock so that the
/// receive thread can take a turn while the send thread waits for the TUN (see
/// [`TunReader::turn`]). One reader at a time keeps packets in the order they were read.
struct TunReader {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Outbox,
    scratch: SendScratch,
    errors: LogLimiter,
    icmp_gro: LazyGro,
    icmp_bufs: Vec<TunBuf>,
}

/// The TUN's reader and who waits for it ([`TunOwner`]).
pub(crate) struct TunSide {
    reader: Mutex<TunReader>,
    owner: TunOwner,
    /// Wakes the session loop for peers wanted on demand.
    wants: Arc<tokio::sync::Notify>,
}

/// Who waits for the TUN: at idle the receive thread, which then serves a whole exchange (a
/// ping's echo reply, a request's answer) on one thread; under load the send thread, so that
/// encryption of outgoing traffic runs beside decryption on the other core.
///
/// The receive thread reads at most one packet (or GSO super-packet) per turn; when more is
/// waiting after its turn, it hands the TUN to the send thread and wakes it
/// ([`TunOwner::hand_to_tx`]). The send thread keeps reading while the TUN has packets and
/// hands it back when a read finds it empty ([`TunOwner::hand_back`]). A packet that arrives
/// in between is never stranded: the receive thread's `poll` includes the TUN whenever it owns
/// it, and the send thread, when it hands the TUN back, wakes the receive thread if it sleeps
/// in a `poll` that did not (`rx_blind`; a store then a load on each side, all sequentially
/// consistent, so at least one side sees the other's store). Turns are taken under the
/// reader's lock and flushed before it is released, so packets leave in the order they were
/// read.
///
/// When both threads waited on the TUN, the reply a receive-thread write produced woke the
/// send thread, usually on the other core, which then held that core when the next thread on
/// the packet's path needed it.
struct TunOwner {
    /// [`RX_OWNS_TUN`] or [`TX_OWNS_TUN`].
    owner: AtomicU8,
    /// Set while the receive thread sleeps in a `poll` without the TUN.
    rx_blind: AtomicBool,
    /// Wakes the send thread when the TUN is handed to it.
    wake_tx: EventFd,
    /// Wakes the receive thread when the TUN is handed back while it was blind.
    wake_rx: EventFd,
    /// The TUN is gone (its interface was deleted): neither thread waits for it any more.
    closed: AtomicBool,
}

const RX_OWNS_TUN: u8 = 0;
const TX_OWNS_TUN: u8 = 1;

impl TunOwner {
    fn new() -> io::Result<TunOwner> {
        Ok(TunOwner {
            owner: AtomicU8::new(RX_OWNS_TUN),
            rx_blind: AtomicBool::new(false),
            wake_tx: EventFd::new()?,
            wake_rx: EventFd::new()?,
            closed: AtomicBool::new(false),
        })
    }

    fn rx_owns(&self) -> bool {
        self.owner.load(Ordering::SeqCst) == RX_OWNS_TUN
    }

    /// The receive thread's wait: for `udp` (a datagram), its wake-up, and `tun` while it owns
    /// it. Returns whether the TUN is readable and the receive thread should take a turn.
    fn rx_wait(&self, udp: RawFd, tun: RawFd, timeout: Duration) -> bool {
        let mut with_tun = self.rx_owns();
        if !with_tun {
            self.rx_blind.store(true, Ordering::SeqCst);
            with_tun = self.rx_owns();
        }
        with_tun &= !self.is_closed();
        let mut fds = [pollfd(udp), pollfd(self.wake_rx.raw()), pollfd(tun)];
        let n = if with_tun { 3 } else { 2 };
        poll_fds(&mut fds[..n], timeout);
        self.rx_blind.store(false, Ordering::SeqCst);
        if fds[1].revents != 0 {
            self.wake_rx.drain();
        }
        let tun_events = if with_tun { fds[2].revents } else { 0 };
        if tun_events & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && tun_events & libc::POLLIN == 0
        {
            // A TUN whose interface is gone reports an error for ever: waiting on it would spin.
            self.close("the TUN reported an error to poll");
            return false;
        }
        tun_events & libc::POLLIN != 0
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The TUN is gone: logged once; the send thread stops, the receive thread goes on
    /// without it.
    fn close(&self, why: &'static str) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                why,
                "the data plane's TUN is gone; packets from it are no longer read"
            );
            self.wake_tx.signal();
        }
    }

    /// After a receive-side read: if `tun` still has packets, the send thread takes over.
    fn rx_read_one(&self, tun: RawFd) {
        let mut fd = [pollfd(tun)];
        poll_fds(&mut fd, Duration::ZERO);
        if fd[0].revents & libc::POLLIN != 0 {
            self.hand_to_tx();
        }
    }

    fn hand_to_tx(&self) {
        self.owner.store(TX_OWNS_TUN, Ordering::SeqCst);
        self.wake_tx.signal();
    }

    /// The send thread's wait while the receive thread owns the TUN.
    fn tx_wait(&self, timeout: Duration) {
        let mut fd = [pollfd(self.wake_tx.raw())];
        poll_fds(&mut fd, timeout);
        self.wake_tx.drain();
    }

    /// The send thread found the TUN empty: the receive thread waits for it from now on.
    fn hand_back(&self) {
        self.owner.store(RX_OWNS_TUN, Ordering::SeqCst);
        if self.rx_blind.load(Ordering::SeqCst) {
            self.wake_rx.signal();
        }
    }
}

/// A non-blocking eventfd: `signal` makes it readable until `drain`.
struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(EventFd(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes from a valid buffer. A full counter (EAGAIN) is still readable.
        unsafe {
            libc::write(self.raw(), one.as_ptr().cast(), one.len());
        }
    }

    fn drain(&self) {
        let mut v = [0u8; 8];
        // SAFETY: 8 bytes into a valid buffer; EAGAIN when already drained.
        unsafe {
            libc::read(self.raw(), v.as_mut_ptr().cast(), v.len());
        }
    }
}

/// What [`TunReader::turn`] found.
enum Turn {
    /// This many reads, each handled and flushed.
    Read(usize),
    /// The TUN is gone: the thread stops.
    Closed,
}

impl TunReader {
    fn new() -> TunReader {
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65536],
            bufs: vec![vec![0u8; TUN_SEGMENT_BUF]; IDEAL_BATCH_SIZE],
            sizes: vec![0usize; IDEAL_BATCH_SIZE],
            out: Outbox::new(),
            scratch: SendScratch::default(),
            errors: LogLimiter::default(),
            icmp_gro: LazyGro::default(),
            icmp_bufs: Vec::new(),
        }
    }

    /// Up to `limit` non-blocking TUN reads (each possibly a GSO super-packet split by tun-rs),
    /// handled under one batch each, then one UDP flush; ICMP errors for destinations without
    /// a peer go back into the TUN.
    fn turn(
        &mut self,
        core: &Core,
        tun: &TunDevice,
        udp: &UdpSocket,
        relay: &RelayQueue,
        limit: usize,
    ) -> Turn {
        let mut reads = 0;
        let mut closed = false;
        while reads < limit {
            match tun
                .dev
                .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)
            {
                Ok(n) => {
                    reads += 1;
                    let now = Instant::now();
                    let mut batch = core.batch();
                    let mut runs = batch.runs();
                    for (buf, &size) in self.bufs.iter().zip(&self.sizes).take(n) {
                        runs.handle_tun_packet(&buf[..size], now, &mut self.out);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.errors.log(&e, "TUN read failed");
                    closed = e.raw_os_error() == Some(libc::EBADFD);
                    break;
                }
            }
        }
        let out = &mut self.out;
        if !out.tun_packets().is_empty() {
            self.icmp_bufs.clear();
            for p in out.tun_packets() {
                self.icmp_bufs.push(TunBuf::with_packet(p));
            }
            write_tun(
                tun,
                &mut self.icmp_gro,
                &mut self.icmp_bufs,
                &mut self.errors,
            );
        }
        if !out.is_empty() {
            udp.send_outbox(out, &mut self.scratch);
            relay.push(core, out);
        }
        out.clear();
        if closed {
            Turn::Closed
        } else {
            Turn::Read(reads)
        }
    }
}

impl TunSide {
    fn new(wants: Arc<tokio::sync::Notify>) -> io::Result<TunSide> {
        Ok(TunSide {
            reader: Mutex::new(TunReader::new()),
            owner: TunOwner::new()?,
            wants,
        })
    }

    /// Wakes the session loop if a batch recorded a want (peers on demand) since the last
    /// look: one atomic load when none did.
    fn signal_wants(&self, core: &Core) {
        if core.take_want_signal() {
            self.wants.notify_one();
        }
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, TunReader> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receive-side turn, if the receive side owns the TUN: one read, sent at once; if the
    /// TUN still has packets after it, the send thread takes over. Called by the receive
    /// thread when its `poll` found the TUN readable, and by any thread that just wrote to
    /// the TUN (what the write produced, a ping's echo reply or a TCP ACK, leaves at once).
    fn rx_turn(&self, core: &Core, tun: &TunDevice, udp: &UdpSocket, relay: &RelayQueue) {
        if !self.owner.rx_owns() || self.owner.is_closed() {
            return;
        }
        let read = {
            let mut reader = self.reader();
            // The send thread may have taken the TUN while this thread waited for the lock.
            if !self.owner.rx_owns() {
                return;
            }
            match reader.turn(core, tun, udp, relay, 1) {
                Turn::Read(n) => n == 1,
                Turn::Closed => {
                    self.owner.close("reading the TUN failed (EBADFD)");
                    false
                }
            }
        };
        self.signal_wants(core);
        if read {
            self.owner.rx_read_one(tun.dev.as_raw_fd());
        }
    }

    /// The receive thread's wait for a datagram, and for the TUN while it owns it. Returns
    /// whether the TUN was readable (a turn was taken).
    fn rx_wait(
        &self,
        core: &Core,
        tun: &TunDevice,
        udp: &UdpSocket,
        relay: &RelayQueue,
        timeout: Duration,
    ) -> bool {
        let readable = self
            .owner
            .rx_wait(udp.raw_fd(), tun.dev.as_raw_fd(), timeout);
        if readable {
            self.rx_turn(core, tun, udp, relay);
        }
        readable
    }
}

fn tx_loop(
    core: &Core,
    tun: &TunDevice,
    udp: &UdpSocket,
    relay: &RelayQueue,
    side: &TunSide,
    stop: &AtomicBool,
) {
    // The first turn after a hand-over sends its read at once; then reads are gathered, up to
    // TUN_READS_PER_FLUSH per UDP flush, while the TUN has packets.
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if side.owner.is_closed() {
            return;
        }
        if side.owner.rx_owns() {
            side.owner.tx_wait(STOP_CHECK);
            first = true;
            continue;
        }
        let limit = if first { 1 } else { TUN_READS_PER_FLUSH };
        let turn = side.reader().turn(core, tun, udp, relay, limit);
        side.signal_wants(core);
        let reads = match turn {
            Turn::Read(n) => n,
            Turn::Closed => {
                side.owner.close("reading the TUN failed (EBADFD)");
                return;
            }
        };
        first = false;
        if reads == 0 {
            side.owner.hand_back();
        }
    }
}

fn rx_loop(
    core: &Core,
    tun: &TunDevice,
    udp: &UdpSocket,
    relay: &RelayQueue,
    side: &TunSide,
    discovery: &Inbox,
    stop: &AtomicBool,
) {
    let mut batch_in = RecvBatch::new(UDP_RECV_SLOTS);
    let mut bufs: Vec<TunBuf> = (0..TUN_WRITE_BATCH).map(|_| TunBuf::new()).collect();
    let mut gro = LazyGro::default();
    let mut out = Outbox::new();
    let mut scratch = SendScratch::default();
    let mut errors = LogLimiter::default();
    let mut spin = ReplySpin::default();
    while !stop.load(Ordering::Relaxed) {
        match udp.recv(&mut batch_in) {
            Ok(_) => {
                let now = Instant::now();
                let coordinator_now_ms =
                    ward_runtime::now_ms().saturating_add(core.clock_offset_ms());
                let mut filled = 0;
                let mut wrote = false;
                let mut batch = core.batch();
                let mut runs = batch.runs();
                for (from, datagram) in batch_in.datagrams() {
                    // Address discovery shares the socket; it never reaches WireGuard.
                    if is_discovery_byte(datagram) {
                        discovery.handle(from, datagram);
                        continue;
                    }
                    let buf = &mut bufs[filled];
                    buf.clear();
                    buf.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
                    let tun_out = &mut buf[VIRTIO_NET_HDR_LEN..];
                    if let Some(n) = runs.handle_datagram(
                        from,
                        datagram,
                        now,
                        coordinator_now_ms,
                        tun_out,
                        &mut out,
                    ) {
                        buf.truncate(VIRTIO_NET_HDR_LEN + n);
                        filled += 1;
                        if filled == bufs.len() {
                            runs.release();
                            write_tun(tun, &mut gro, &mut bufs[..filled], &mut errors);
                            filled = 0;
                            wrote = true;
                        }
                    }
                }
                drop(runs);
                drop(batch);
                wrote |= filled > 0;
                write_tun(tun, &mut gro, &mut bufs[..filled], &mut errors);
                if !out.is_empty() {
                    udp.send_outbox(&out, &mut scratch);
                    relay.push(core, &out);
                    out.clear();
                }
                side.signal_wants(core);
                if wrote {
                    side.rx_turn(core, tun, udp, relay);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let began = Instant::now();
                if spin.spinning(began) {
                    side.rx_wait(core, tun, udp, relay, Duration::ZERO);
                    std::hint::spin_loop();
                } else {
                    let from_tun = side.rx_wait(core, tun, udp, relay, STOP_CHECK);
                    spin.woke(from_tun, began, Instant::now());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. ECONNREFUSED from an ICMP error for an earlier send: nothing to do.
                errors.log(&e, "UDP receive failed");
            }
        }
    }
}

/// A quiet spell at least this long before a packet from the TUN makes the receive thread
/// wait for the answer without sleeping ([`ReplySpin`]).
const QUIET_BEFORE_SPIN: Duration = Duration::from_millis(1);
/// How long the receive thread polls without sleeping after such a packet left.
const REPLY_SPIN: Duration = Duration::from_micros(300);

/// Waiting for an answer without sleeping, after sparse traffic: when the receive thread wakes
/// for a packet from the TUN (an application on this device sent a request, a ping) after a
/// quiet spell, it polls without blocking for [`REPLY_SPIN`] rather than going back to sleep,
/// so the peer's answer is read the moment it lands. Sleeping would put the core into an idle
/// state, and on a virtual machine waking it again costs tens of microseconds (the largest
/// part of an idle round trip through the tunnel). Bounded: one window per wake-up after a
/// quiet spell, never under load (the waits are then short) and never for packets from the
/// network (nothing answers an answer), so an idle device does not spend CPU on it.
#[derive(Debug, Default)]
struct ReplySpin {
    until: Option<Instant>,
}

impl ReplySpin {
    /// A blocking wait that began at `began` returned at `now`, for the TUN if `from_tun`.
    fn woke(&mut self, from_tun: bool, began: Instant, now: Instant) {
        self.until = (from_tun && now.saturating_duration_since(began) >= QUIET_BEFORE_SPIN)
            .then(|| now + REPLY_SPIN);
    }

    /// Whether the thread should poll without blocking at `now`.
    fn spinning(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if now < until => true,
            _ => {
                self.until = None;
                false
            }
        }
    }
}

fn write_tun(tun: &TunDevice, gro: &mut LazyGro, bufs: &mut [TunBuf], errors: &mut LogLimiter) {
    if bufs.is_empty() {
        return;
    }
    if let Err(e) = tun.dev.send_multiple(gro.get(), bufs, VIRTIO_NET_HDR_LEN) {
        errors.log(&e, "TUN write failed");
    }
    for b in bufs {
        b.release();
    }
}

fn timer_loop(core: &Core, udp: &UdpSocket, relay: &RelayQueue, wake: &Wake, stop: &AtomicBool) {
    let mut out = Outbox::new();
    let mut scratch = SendScratch::default();
    let mut last_report = Instant::now();
    let mut last_refresh = Instant::now();
    let mut last_counters = core.counters();
    while !stop.load(Ordering::Relaxed) {
        // TIMER_INTERVAL, or shorter while a punch burst is under way.
        std::thread::sleep(core.timer_wait());
        let now = Instant::now();
        core.handle_timers(now, &mut out);
        // The session loop sleeps until its next housekeeping point: wake it for punch
        // requests, so they reach the coordinator while this side's burst is under way.
        if core.punch_pending() {
            wake.punch.notify_one();
        }
        // Wants are signalled by the batch that records them; this catches any other.
        if core.take_want_signal() {
            wake.wants.notify_one();
        }
        if !out.is_empty() {
            udp.send_outbox(&out, &mut scratch);
            relay.push(core, &out);
            out.clear();
        }
        if now.duration_since(last_refresh) >= REFRESH_INTERVAL {
            udp.refresh_path_mtus();
            last_refresh = now;
        }
        if now.duration_since(last_report) >= Duration::from_secs(30) {
            core.expire_flows(now);
            let c = core.counters();
            if c != last_counters {
                tracing::debug!(counters = ?c, "data plane counters");
                last_counters = c;
            }
            last_report = now;
        }
    }
}

/// Logs an I/O error at most every 10 s, with the number suppressed since.
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn log(&mut self, e: &io::Error, what: &'static str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        tracing::debug!(error = %e, suppressed = self.suppressed, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receive thread polls without sleeping only for a bounded window after a packet
    /// from the TUN that followed a quiet spell: not after a datagram from the network, not
    /// after a short wait (traffic under load), and never past the window.
    #[test]
    fn the_reply_spin_follows_only_a_request_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut spin = ReplySpin::default();
        assert!(!spin.spinning(t0), "no window before any wake-up");

        // A ping after 20 ms of silence: the window opens at the wake-up.
        let woke = t0 + Duration::from_millis(20);
        spin.woke(true, t0, woke);
        assert!(spin.spinning(woke));
        assert!(spin.spinning(woke + REPLY_SPIN / 2));
        assert!(!spin.spinning(woke + REPLY_SPIN), "the window is bounded");
        assert!(
            !spin.spinning(woke + REPLY_SPIN / 2),
            "a closed window does not reopen by itself"
        );

        // A datagram from the network after the same silence: nothing to wait for.
        spin.woke(false, t0, woke);
        assert!(!spin.spinning(woke));

        // A packet from the TUN after a short wait (traffic under load): sleep as usual.
        let soon = t0 + QUIET_BEFORE_SPIN / 2;
        spin.woke(true, t0, soon);
        assert!(!spin.spinning(soon));

        // A later long wait opens a new window.
        let later = woke + Duration::from_millis(20);
        spin.woke(true, woke, later);
        assert!(spin.spinning(later + REPLY_SPIN / 4));
    }

    /// tun-rs appends a TCP segment to its flow's first buffer only when that buffer's
    /// capacity holds twice the virtio-net header plus the coalesced packet: the buffers of
    /// both receive paths must promise room for a full 64 KiB write of full-size segments, or
    /// every write carries a few segments only (with 4 KiB buffers the relayed path wrote
    /// three at most, a third of a syscall per packet).
    #[test]
    fn tun_write_buffers_hold_a_full_coalesced_write() {
        let headers = 20 + 32; // IPv4, TCP with timestamps
        let mss = usize::from(TUN_MTU) - headers;
        let segments = (usize::from(u16::MAX) - headers) / mss;
        assert!(segments >= 40, "{segments}");
        let coalesced = headers + segments * mss;
        let room = 2 * VIRTIO_NET_HDR_LEN + coalesced;
        assert!(
            TunBuf::new().buf_capacity() >= room,
            "{} < {room}",
            TunBuf::new().buf_capacity()
        );
        // Each batch has packets enough for one such write.
        assert!(TUN_WRITE_BATCH >= segments && RELAYED_TUN_BATCH >= segments);
    }

    /// A non-blocking pipe: (read end, write end).
    fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: two descriptors written into a valid array; checked below.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: fresh descriptors owned by nothing else.
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    /// The TUN changes hands between the receive and the send thread without stranding a
    /// packet. A pipe stands in for the TUN; a writer puts bytes into it in bursts and pauses;
    /// two threads read it the way the driver's do: the receive side one byte per turn,
    /// handing over when more is waiting, the send side until the pipe is empty, then handing
    /// back. Every byte is read once, in order, and none waits anywhere near the threads'
    /// timeout (10 s here, so a lost wake-up shows as a wait of seconds).
    #[test]
    fn the_tun_changes_hands_without_stranding_a_packet() {
        const N: usize = 4000;
        const TIMEOUT: Duration = Duration::from_secs(10);
        let owner = Arc::new(TunOwner::new().expect("eventfds"));
        let (tun_r, tun_w) = pipe();
        let (quiet_r, _quiet_w) = pipe(); // the receive thread's "UDP socket": never readable
        let tun_r = tun_r.as_raw_fd();
        let quiet = quiet_r.as_raw_fd();
        let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(N)));
        // (bytes read, longest wait, out-of-order reads, reads by the receive thread)
        let reader = Arc::new(Mutex::new((0usize, Duration::ZERO, 0usize, 0usize)));
        let done = Arc::new(AtomicBool::new(false));
        // Reads at most `limit` bytes under the reader's lock; returns how many.
        let read = {
            let (sent, reader, done) = (sent.clone(), reader.clone(), done.clone());
            move |limit: usize, by_rx: bool| -> usize {
                let mut r = reader.lock().expect("reader");
                let mut got = 0;
                while got < limit {
                    let mut b = [0u8; 1];
                    // SAFETY: one byte into a valid buffer.
                    let n = unsafe { libc::read(tun_r, b.as_mut_ptr().cast(), 1) };
                    if n != 1 {
                        break;
                    }
                    let k = r.0;
                    let wait = sent.lock().expect("sent")[k].elapsed();
                    r.1 = r.1.max(wait);
                    r.2 += usize::from(b[0] != (k % 251) as u8);
                    r.3 += usize::from(by_rx);
                    r.0 += 1;
                    got += 1;
                }
                if r.0 == N {
                    done.store(true, Ordering::SeqCst);
                }
                got
            }
        };
        let rx = {
            let (owner, done, read) = (owner.clone(), done.clone(), read.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if owner.rx_wait(quiet, tun_r, TIMEOUT) && owner.rx_owns() && read(1, true) == 1
                    {
                        owner.rx_read_one(tun_r);
                    }
                }
            })
        };
        let tx = {
            let (owner, done) = (owner.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if owner.rx_owns() {
                        owner.tx_wait(TIMEOUT);
                    } else if read(TUN_READS_PER_FLUSH, false) == 0 {
                        owner.hand_back();
                    }
                }
            })
        };
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut k = 0;
        while k < N {
            let burst = 1 + (next() % 24) as usize;
            for _ in 0..burst.min(N - k) {
                sent.lock().expect("sent").push(Instant::now());
                let b = [(k % 251) as u8];
                // SAFETY: one byte from a valid buffer; the pipe never fills (64 KiB).
                let n = unsafe { libc::write(tun_w.as_raw_fd(), b.as_ptr().cast(), 1) };
                assert_eq!(n, 1);
                k += 1;
            }
            std::thread::sleep(Duration::from_micros(u64::from(next() % 400)));
        }
        let deadline = Instant::now() + 3 * TIMEOUT;
        while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::SeqCst);
        owner.wake_rx.signal();
        owner.wake_tx.signal();
        rx.join().expect("receive side");
        tx.join().expect("send side");
        let (count, longest, disorder, by_rx) = *reader.lock().expect("reader");
        assert_eq!(count, N, "every byte read");
        assert_eq!(disorder, 0, "in order");
        assert!(
            longest < TIMEOUT / 5,
            "a byte waited {longest:?}: a hand-over lost its wake-up"
        );
        // Both sides served: the receive side at the start of bursts, the send side the rest.
        assert!(by_rx > 0 && by_rx < N, "receive side read {by_rx} of {N}");
    }

    /// A TUN whose interface is gone reports an error to every `poll`: the receive thread
    /// stops waiting on it (instead of waking for it at once, for ever) and keeps serving its
    /// socket; the send thread is told. A pipe whose writer is closed stands in for it.
    #[test]
    fn a_tun_that_reports_an_error_is_no_longer_waited_on() {
        let owner = TunOwner::new().expect("eventfds");
        let (tun_r, tun_w) = pipe();
        let (quiet_r, _quiet_w) = pipe();
        drop(tun_w);
        let wait = Duration::from_millis(60);
        assert!(!owner.rx_wait(quiet_r.as_raw_fd(), tun_r.as_raw_fd(), wait));
        assert!(owner.is_closed());
        let mut fd = [pollfd(owner.wake_tx.raw())];
        poll_fds(&mut fd, Duration::ZERO);
        assert_ne!(fd[0].revents & libc::POLLIN, 0, "the send thread is woken");
        // From now on the wait lasts its timeout: the broken TUN is no longer in it.
        let t0 = Instant::now();
        assert!(!owner.rx_wait(quiet_r.as_raw_fd(), tun_r.as_raw_fd(), wait));
        assert!(t0.elapsed() >= wait / 2, "{:?}", t0.elapsed());
    }

    /// One IPv4 TCP segment (ACK only, no options) of `flow` with sequence number `seq`.
    fn tcp_segment(flow: u8, seq: u32, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[20..22].copy_from_slice(&(40000 + u16::from(flow)).to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&1u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10; // ACK
        p[34..36].copy_from_slice(&65535u16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i as u8) ^ flow;
        }
        // tun-rs checks both checksums before it coalesces.
        let ip = checksum(0, &p[..20]);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
        let tcp = checksum(sum16(0, &pseudo), &p[20..]);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
        for c in bytes.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        acc
    }

    fn checksum(acc: u32, bytes: &[u8]) -> u16 {
        let mut s = sum16(acc, bytes);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// A batch of full-size segments of two flows, in runs as they come off the wire, is
    /// coalesced by tun-rs into one buffer per flow: those two grow to hold the whole flow's
    /// bytes (tun-rs appends to them although they started with one packet's room), the rest
    /// stay as they were, and after the write every buffer is back to one packet's room.
    #[test]
    fn coalesced_writes_grow_only_the_first_buffer_of_each_flow_and_give_it_back() {
        let mss = 1380;
        let per_flow = 20;
        let mut bufs: Vec<TunBuf> = Vec::new();
        for flow in 0..2u8 {
            for k in 0..per_flow {
                bufs.push(TunBuf::with_packet(&tcp_segment(
                    flow,
                    1000 + k * mss as u32,
                    mss,
                )));
            }
        }
        for b in &bufs {
            assert!(b.capacity() <= TUN_PACKET_BUF + 64, "{}", b.capacity());
        }
        let mut gro = LazyGro::default();
        gro.get()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .expect("GRO over well-formed segments");
        let whole = VIRTIO_NET_HDR_LEN + 40 + per_flow as usize * mss;
        assert_eq!(
            bufs[0].len(),
            whole,
            "flow 0 coalesced into its first buffer"
        );
        assert_eq!(bufs[per_flow as usize].len(), whole, "flow 1 likewise");
        let grown = bufs
            .iter()
            .filter(|b| b.capacity() > TUN_PACKET_BUF)
            .count();
        assert_eq!(grown, 2, "only the two first buffers grew");
        // The coalesced bytes are the flow's payloads in order.
        let head = &bufs[per_flow as usize][VIRTIO_NET_HDR_LEN + 40..];
        for (k, chunk) in head.chunks(mss).enumerate() {
            assert_eq!(
                chunk,
                &tcp_segment(1, 1000 + (k * mss) as u32, mss)[40..],
                "segment {k}"
            );
        }
        for b in &mut bufs {
            b.release();
        }
        assert!(bufs.iter().all(|b| b.capacity() <= TUN_PACKET_BUF));
        assert!(bufs.iter().all(|b| b.parked.is_none()));
        // The two 64 KiB buffers went back to the thread and serve the next batch.
        let lent: Vec<*const u8> = LARGE.with(|l| l.borrow().iter().map(|v| v.as_ptr()).collect());
        assert_eq!(lent.len(), 2);
        let mut bufs: Vec<TunBuf> = (0..per_flow)
            .map(|k| TunBuf::with_packet(&tcp_segment(2, 1000 + k * mss as u32, mss)))
            .collect();
        gro.get()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .expect("GRO over well-formed segments");
        assert_eq!(bufs[0].len(), whole);
        assert!(lent.contains(&bufs[0].as_ptr()), "a kept buffer was reused");
        for b in &mut bufs {
            b.release();
        }
        assert_eq!(LARGE.with(|l| l.borrow().len()), 2);
    }
}
