//! Runs: a batch keeps the last peer's session locked across that peer's consecutive packets,
//! on both paths, and the two paths still run at once on two threads.

use super::*;

/// The peer entry `i`'s core has for `node`'s address.
fn entry(net: &Net, i: usize, node: usize) -> Arc<Peer> {
    let table = read(&net.nodes[i].core.table);
    table.claimants(IpAddr::V4(net.nodes[node].ipv4))[0].clone()
}

fn locked(peer: &Peer) -> bool {
    peer.session.try_lock().is_err()
}

/// Encrypts `n` numbered packets from node `from` to node `to`; returns the datagrams.
fn datagrams(net: &Net, from: usize, to: usize, n: u32) -> Vec<Vec<u8>> {
    let (src, dst) = (net.nodes[from].ipv4, net.nodes[to].ipv4);
    let mut out = Outbox::new();
    let mut batch = net.nodes[from].core.batch();
    let mut runs = batch.runs();
    for k in 0..n {
        runs.handle_tun_packet(&ipv4_packet(src, dst, &k.to_be_bytes()), net.now, &mut out);
    }
    drop(runs);
    drop(batch);
    out.iter().map(|(_, d)| d.to_vec()).collect()
}

#[test]
fn a_run_holds_its_peers_session_until_a_packet_for_another_peer() {
    let mut net = Net::new(3, 31);
    net.full_mesh();
    net.run_until_established(Duration::from_secs(5));
    let (b, c) = (entry(&net, 0, 1), entry(&net, 0, 2));
    let ips: Vec<Ipv4Addr> = net.nodes.iter().map(|n| n.ipv4).collect();
    let from_b = datagrams(&net, 1, 0, 3);
    let from_c = datagrams(&net, 2, 0, 1);
    let now = net.now;
    let mut out = Outbox::new();
    let mut buf = vec![0u8; 65536];
    let core = &net.nodes[0].core;
    let mut batch = core.batch();
    let mut runs = batch.runs();

    // 1. Send path: the run to B keeps B's session locked, C's free.
    for k in 0..3u32 {
        runs.handle_tun_packet(
            &ipv4_packet(ips[0], ips[1], &k.to_be_bytes()),
            now,
            &mut out,
        );
        assert!(locked(&b) && !locked(&c), "packet {k} to B");
    }
    // 2. A packet for C ends B's run and starts C's.
    runs.handle_tun_packet(&ipv4_packet(ips[0], ips[2], b"c"), now, &mut out);
    assert!(!locked(&b) && locked(&c));
    // 3. A packet without a route (ICMP limiter: ranks before sessions) ends the run.
    runs.handle_tun_packet(
        &ipv4_packet(ips[0], Ipv4Addr::new(100, 64, 0, 99), b"x"),
        now,
        &mut out,
    );
    assert!(!locked(&b) && !locked(&c));
    // 4. Receive path, in the same batch: B's datagrams are one run, then C's.
    for d in &from_b {
        let n = runs.handle_datagram(net.nodes[1].src, d, now, COORD_MS, &mut buf, &mut out);
        assert!(n.is_some(), "B's datagram delivered");
        assert!(locked(&b) && !locked(&c));
    }
    let n = runs.handle_datagram(
        net.nodes[2].src,
        &from_c[0],
        now,
        COORD_MS,
        &mut buf,
        &mut out,
    );
    assert!(n.is_some(), "C's datagram delivered");
    assert!(!locked(&b) && locked(&c));
    // 5. Garbage keeps the run; release ends it.
    let n = runs.handle_datagram(
        net.nodes[1].src,
        &[4, 0, 0, 0],
        now,
        COORD_MS,
        &mut buf,
        &mut out,
    );
    assert!(n.is_none());
    assert!(locked(&c));
    runs.release();
    assert!(!locked(&b) && !locked(&c));
    runs.handle_tun_packet(&ipv4_packet(ips[0], ips[1], b"again"), now, &mut out);
    assert!(locked(&b));
    drop(runs);
    assert!(!locked(&b) && !locked(&c), "dropping the runs unlocks");
    drop(batch);
    assert_eq!(out.len(), 5, "every routed packet became one datagram");
    assert_eq!(core.counters().rx_packets, 4);
}

#[test]
fn both_paths_and_the_timers_run_at_once_on_three_threads() {
    const BATCHES: u32 = 200;
    const PER_BATCH: u32 = 32;
    let net = established_pair(32);
    let inbound = datagrams(&net, 1, 0, BATCHES * PER_BATCH);
    assert_eq!(inbound.len(), (BATCHES * PER_BATCH) as usize);
    let core = &net.nodes[0].core;
    let (src, dst) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    let from = net.nodes[1].src;
    let now = net.now;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, delivered) = std::thread::scope(|scope| {
        let tx = scope.spawn(|| {
            let mut out = Outbox::new();
            let mut sent = 0;
            for b in 0..BATCHES {
                let mut batch = core.batch();
                let mut runs = batch.runs();
                for k in 0..PER_BATCH {
                    let p = ipv4_packet(src, dst, &(b * PER_BATCH + k).to_be_bytes());
                    runs.handle_tun_packet(&p, now, &mut out);
                }
                drop(runs);
                drop(batch);
                sent += out.len();
                out.clear();
            }
            sent
        });
        let rx = scope.spawn(|| {
            let mut out = Outbox::new();
            let mut buf = vec![0u8; 65536];
            let mut delivered = 0;
            for chunk in inbound.chunks(PER_BATCH as usize) {
                let mut batch = core.batch();
                let mut runs = batch.runs();
                for d in chunk {
                    if runs
                        .handle_datagram(from, d, now, COORD_MS, &mut buf, &mut out)
                        .is_some()
                    {
                        delivered += 1;
                    }
                }
                drop(runs);
                drop(batch);
                out.clear();
            }
            delivered
        });
        scope.spawn(|| {
            let mut out = Outbox::new();
            while !stop.load(Ordering::Relaxed) {
                core.handle_timers(now, &mut out);
                let _ = core.status();
                out.clear();
                std::thread::yield_now();
            }
        });
        let sent = tx.join().unwrap();
        let delivered = rx.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (sent, delivered)
    });
    assert_eq!(sent, (BATCHES * PER_BATCH) as usize);
    assert_eq!(delivered, BATCHES * PER_BATCH);
}
