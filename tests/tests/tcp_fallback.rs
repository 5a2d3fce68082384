//! The TLS-over-TCP fallback with the real `ward-coordinator` and `ward-relay` on loopback:
//! where UDP to the coordinator's port is not answered, a device enrolls and holds its control
//! session over TCP (same certificates, same frames); a device's relay link over TCP forwards
//! datagrams to and from a device on QUIC through the same forwarding core; garbage, a client
//! without the application protocol and an oversized frame over TCP are refused while the
//! legitimate sessions and links keep working; a daemon whose session fell back to TCP moves it
//! back to QUIC once UDP gets through again.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;
mod relay_control;

use common::{bin, free_udp_port, wait_until, Agent, Coordinator, Proc};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use ward_client::control::{self, Channel, TCP_HEAD_START};
use ward_runtime::stream::Transport;
use ward_shared::relay::{
    encode_datagram, encode_tcp_datagram, encode_tcp_msg, encode_tcp_ping, parse_tcp_frame,
    relay_server_name, split_datagram, DeviceToRelay, RelayToDevice, SignedTicket, TcpFrame,
    MAX_RELAY_STREAM_FRAME, RELAY_PROTOCOL_VERSION, TCP_MAX_DATAGRAM,
};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, ErrorCode, FrameDecoder, Hello,
};

/// A port where UDP goes unanswered (a socket that never reads) and TCP is passed through to
/// `to`: what a device sees on a network that drops UDP.
async fn udp_dead_tcp_proxy(to: SocketAddr) -> (SocketAddr, UdpSocket) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let silent = UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let Ok(mut out) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    (addr, silent)
}

fn hello() -> DeviceMsg {
    DeviceMsg::Hello(Hello {
        held_peers: Vec::new(),
        holding: None,
        protocol: wire::PROTOCOL_VERSION,
        os: "test".into(),
        version: "0".into(),
        update: DeviceUpdate::default(),
    })
}

/// The next message that `pick` accepts, within 5 s.
async fn next_matching<T>(
    ch: &mut Channel,
    mut pick: impl FnMut(CoordinatorMsg) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, ch.recv())
            .await
            .expect("an answer within 5 s")
            .unwrap()
            .expect("the session stays open");
        if let Some(v) = pick(m) {
            return v;
        }
    }
}

/// The session answers a ping.
async fn alive(ch: &mut Channel, nonce: u64) {
    ch.send(&DeviceMsg::Ping { nonce }).await.unwrap();
    next_matching(ch, |m| match m {
        CoordinatorMsg::Pong { nonce: n, .. } if n == nonce => Some(()),
        _ => None,
    })
    .await;
}

/// Reads until the peer closes (EOF or reset) within 12 s; the bytes read before.
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(12), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server did not close the connection");
    got
}

#[test]
fn device_enrolls_and_holds_its_session_over_tcp_where_udp_is_not_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "hana"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let coord: SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
        let (proxy, _silent) = udp_dead_tcp_proxy(coord).await;
        let mut tok = EnrollToken::parse(&c.token(&["--user", "hana"])).unwrap();
        tok.coordinator = proxy.to_string();

        // Enrollment: QUIC gets no answer, TLS over TCP starts after the head start and wins.
        let t0 = Instant::now();
        let (enrolled, key) = control::enroll(&tok, "hana1", "test").await.unwrap();
        let took = t0.elapsed();
        eprintln!("enrolled over TCP in {took:?}");
        assert!(
            took >= TCP_HEAD_START,
            "TCP started before QUIC's head start: {took:?}"
        );
        assert!(took < TCP_HEAD_START + Duration::from_secs(3), "{took:?}");

        // The session: mutual TLS with the device certificate, over TCP.
        let endpoint = control::client_endpoint().unwrap();
        let cfgs =
            control::session_configs(&enrolled.ca_der.0, &enrolled.cert_der.0, &key).unwrap();
        let mut ch = Channel::open_either(Some(&endpoint), &cfgs, &[proxy])
            .await
            .unwrap();
        assert_eq!(ch.transport, Transport::Tcp);
        ch.send(&hello()).await.unwrap();
        next_matching(&mut ch, |m| {
            matches!(m, CoordinatorMsg::Netmap(_)).then_some(())
        })
        .await;
        alive(&mut ch, 1).await;
        let devs = c.admin_json(&["device", "ls"]);
        assert_eq!(devs[0]["hostname"], "hana1");

        // Where UDP works, the same call takes QUIC.
        let mut q = Channel::open_either(Some(&endpoint), &cfgs, &[coord])
            .await
            .unwrap();
        assert_eq!(q.transport, Transport::Quic);
        q.send(&hello()).await.unwrap();
        alive(&mut q, 2).await;
    });
}

#[test]
fn bad_input_over_tcp_is_refused_while_sessions_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "hana"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let coord: SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
        let tok = EnrollToken::parse(&c.token(&["--user", "hana"])).unwrap();
        let (enrolled, key) = control::enroll(&tok, "hana1", "test").await.unwrap();
        let cfgs =
            control::session_configs(&enrolled.ca_der.0, &enrolled.cert_der.0, &key).unwrap();
        // A legitimate session over TCP (no UDP endpoint at all).
        let mut ch = Channel::open_either(None, &cfgs, &[coord]).await.unwrap();
        assert_eq!(ch.transport, Transport::Tcp);
        ch.send(&hello()).await.unwrap();
        alive(&mut ch, 1).await;

        // 1. Garbage instead of TLS: closed.
        let mut g = TcpStream::connect(coord).await.unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut g).await;
        assert!(!answer.starts_with(b"HTTP"), "{answer:?}");
        alive(&mut ch, 2).await;

        // 2. TLS without an application protocol: the handshake completes, nothing is served.
        let mut no_alpn = (*cfgs.tls).clone();
        no_alpn.alpn_protocols.clear();
        let tcp = TcpStream::connect(coord).await.unwrap();
        let mut tls = tokio_rustls_connect(no_alpn, tcp).await;
        tls.write_all(&wire::encode(&hello())).await.unwrap();
        let answer = read_to_close(&mut tls).await;
        assert!(answer.is_empty(), "served without ALPN: {answer:?}");
        alive(&mut ch, 3).await;

        // 3. An oversized frame: an error frame, then the connection closes.
        let mut big = ward_runtime::stream::connect_tls(
            coord,
            cfgs.tls.clone(),
            wire::COORDINATOR_SERVER_NAME,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        big.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let answer = read_to_close(&mut big).await;
        let mut dec = FrameDecoder::new(wire::MAX_COORDINATOR_FRAME);
        dec.push(&answer);
        let frame = dec.next_frame().unwrap().expect("an error frame");
        match wire::decode::<CoordinatorMsg>(&frame).unwrap() {
            CoordinatorMsg::Error { code, message } => {
                assert_eq!(code, ErrorCode::Protocol);
                assert!(message.contains("exceeds"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        alive(&mut ch, 4).await;

        // 4. A TLS client that never speaks is dropped after the handshake timeout, and a
        // half-open TCP connection that never starts TLS too (bounded, not held forever).
        let mut idle = TcpStream::connect(coord).await.unwrap();
        let t0 = Instant::now();
        read_to_close(&mut idle).await;
        assert!(t0.elapsed() >= Duration::from_secs(5), "{:?}", t0.elapsed());
        alive(&mut ch, 5).await;
    });
}

async fn tokio_rustls_connect(
    cfg: rustls::ClientConfig,
    tcp: TcpStream,
) -> ward_runtime::stream::client::TlsStream<TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(wire::COORDINATOR_SERVER_NAME).unwrap();
    ward_runtime::stream::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A device's relay link over TCP: its frames in and out.
struct TcpLink {
    tls: ward_runtime::stream::client::TlsStream<TcpStream>,
    dec: FrameDecoder,
}

impl TcpLink {
    async fn open(
        relay: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
        ticket: SignedTicket,
    ) -> (TcpLink, RelayToDevice) {
        let tls = ward_runtime::stream::connect_tls(
            relay,
            cfg,
            &relay_server_name("r1"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut l = TcpLink {
            tls,
            dec: FrameDecoder::new(MAX_RELAY_STREAM_FRAME),
        };
        l.tls
            .write_all(&encode_tcp_msg(&DeviceToRelay::Hello {
                protocol: RELAY_PROTOCOL_VERSION,
                ticket,
            }))
            .await
            .unwrap();
        let answer = loop {
            let f = l.next().await.expect("an answer");
            if let Some(TcpFrame::Msg(m)) = parse_tcp_frame(&f) {
                break wire::decode::<RelayToDevice>(m).unwrap();
            }
        };
        (l, answer)
    }

    async fn next(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(
            Duration::from_secs(2),
            ward_runtime::stream::read_frame(&mut self.tls, &mut self.dec),
        )
        .await
        .ok()?
        .ok()?
    }

    /// Whether the relay closes the link within `d` (frames before the end are skipped).
    async fn closes_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, async {
            loop {
                match ward_runtime::stream::read_frame(&mut self.tls, &mut self.dec).await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await
        .is_ok()
    }

    /// The next datagram (source, body), skipping pongs.
    async fn datagram(&mut self) -> Option<(DeviceId, Vec<u8>)> {
        loop {
            let f = self.next().await?;
            match parse_tcp_frame(&f)? {
                TcpFrame::Datagram(d) => {
                    let (id, b) = split_datagram(d)?;
                    return Some((id, b.to_vec()));
                }
                TcpFrame::Pong(_) | TcpFrame::Ping(_) => continue,
                TcpFrame::Msg(m) => panic!("{:?}", wire::decode::<RelayToDevice>(m)),
            }
        }
    }
}

/// A relay link over TCP (device a) and one over QUIC (device b) exchange datagrams both ways.
async fn exchange(a: &mut TcpLink, b: &quinn::Connection, ida: u64, idb: u64, n: usize) {
    for i in 0..n {
        let body = format!("tcp-to-quic-{i:04}").repeat(20);
        a.tls
            .write_all(&encode_tcp_datagram(DeviceId(idb), body.as_bytes()))
            .await
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(2), b.read_datagram())
            .await
            .expect("the datagram reaches the QUIC device")
            .unwrap();
        assert_eq!(split_datagram(&d), Some((DeviceId(ida), body.as_bytes())));
        let back = format!("quic-to-tcp-{i:04}").repeat(20);
        b.send_datagram(encode_datagram(DeviceId(ida), back.as_bytes()).into())
            .unwrap();
        let (from, got) = a
            .datagram()
            .await
            .expect("the datagram reaches the TCP device");
        assert_eq!((from, got), (DeviceId(idb), back.into_bytes()));
    }
}

#[test]
fn relay_link_over_tcp_forwards_like_quic_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "rita"]);
    let port = free_udp_port();
    let relay_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cred = c.admin(&["relay", "add", "r1", "--addr", &relay_addr.to_string()]);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = Proc::spawn(
        Command::new(bin("ward-relay"))
            .args(["serve", "--listen", &relay_addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("WARD_RELAY_TOKEN", cred.trim())
            .env("WARD_LOG", "info"),
        tmp.path().join("relay.log"),
    );
    wait_until("relay ls says online", Duration::from_secs(15), || {
        c.admin_json(&["relay", "ls"])[0]["online"] == true
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = enroll_with_ticket(&c, "rita1").await;
        let b = enroll_with_ticket(&c, "rita2").await;
        let (ida, idb) = (a.1.ticket.device_id.0, b.1.ticket.device_id.0);

        let (mut la, answer) = TcpLink::open(relay_addr, a.2.tls.clone(), a.1.clone()).await;
        assert!(
            matches!(answer, RelayToDevice::Welcome { device_id, max_datagram } if device_id.0 == ida && max_datagram == TCP_MAX_DATAGRAM),
            "{answer:?}"
        );
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let dev_b = relay_control::Device::enrolled(b.3.clone(), &b.4, b.5.clone());
        let sb = relay_control::connect(&ep, relay_addr, "r1", dev_b.client_config(), b.1.clone())
            .await
            .unwrap();
        assert!(matches!(sb.answer, RelayToDevice::Welcome { .. }));
        exchange(&mut la, &sb.conn, ida, idb, 20).await;

        // The ping is answered (the device's RTT sample and keepalive).
        la.tls.write_all(&encode_tcp_ping(77)).await.unwrap();
        let pong = loop {
            let f = la.next().await.expect("a pong");
            if let Some(TcpFrame::Pong(n)) = parse_tcp_frame(&f) {
                break n;
            }
        };
        assert_eq!(pong, 77);

        // A ticket for another device is refused over TCP as over QUIC.
        let (mut stolen, answer) =
            TcpLink::open(relay_addr, a.2.tls.clone(), b.1.clone()).await;
        assert!(matches!(answer, RelayToDevice::Error { .. }), "{answer:?}");
        assert!(
            stolen.closes_within(Duration::from_secs(2)).await,
            "closed after the refusal"
        );

        // Garbage, no ALPN, an oversized frame and an unknown frame type: all closed.
        let mut g = TcpStream::connect(relay_addr).await.unwrap();
        g.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0]).await.unwrap();
        read_to_close(&mut g).await;
        let mut no_alpn = (*a.2.tls).clone();
        no_alpn.alpn_protocols.clear();
        let tcp = TcpStream::connect(relay_addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(relay_server_name("r1")).unwrap();
        let mut tls = ward_runtime::stream::TlsConnector::from(Arc::new(no_alpn))
            .connect(name, tcp)
            .await
            .unwrap();
        tls.write_all(&encode_tcp_msg(&DeviceToRelay::Hello {
            protocol: RELAY_PROTOCOL_VERSION,
            ticket: a.1.clone(),
        }))
        .await
        .unwrap();
        assert!(read_to_close(&mut tls).await.is_empty(), "served without ALPN");
        for bad in [u32::MAX.to_be_bytes().to_vec(), vec![0, 0, 0, 2, 9, 9]] {
            let mut s = ward_runtime::stream::connect_tls(
                relay_addr,
                a.2.tls.clone(),
                &relay_server_name("r1"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            s.write_all(&bad).await.unwrap();
            read_to_close(&mut s).await;
        }
        // The legitimate links go on.
        exchange(&mut la, &sb.conn, ida, idb, 5).await;

        // A revoked device's TCP link is closed at once (well before the 5 s idle bound).
        c.admin(&["device", "revoke", "rita1"]);
        assert!(
            la.closes_within(Duration::from_secs(3)).await,
            "the revoked device's TCP link is still open"
        );
        drop(relay);
    });
}

/// Enrolls `name`, opens its session (QUIC) and takes a relay ticket: (session, ticket,
/// relay configs, certificate, key PEM, CA).
async fn enroll_with_ticket(
    c: &Coordinator,
    name: &str,
) -> (
    Channel,
    SignedTicket,
    control::Configs,
    Vec<u8>,
    String,
    Vec<u8>,
) {
    let tok = EnrollToken::parse(&c.token(&["--user", "rita"])).unwrap();
    let (enrolled, key) = control::enroll(&tok, name, "test").await.unwrap();
    let endpoint = control::client_endpoint().unwrap();
    let cfgs = control::session_configs(&enrolled.ca_der.0, &enrolled.cert_der.0, &key).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let mut ch = Channel::open_either(Some(&endpoint), &cfgs, &[addr])
        .await
        .unwrap();
    ch.send(&hello()).await.unwrap();
    ch.send(&DeviceMsg::RelayTicketRequest).await.unwrap();
    let ticket = next_matching(&mut ch, |m| match m {
        CoordinatorMsg::RelayTicket { ticket } => Some(ticket),
        _ => None,
    })
    .await;
    let relay_cfgs =
        control::relay_configs(&enrolled.ca_der.0, &enrolled.cert_der.0, &key).unwrap();
    (
        ch,
        ticket,
        relay_cfgs,
        enrolled.cert_der.0,
        key,
        enrolled.ca_der.0,
    )
}

/// Forwards UDP arriving on `addr` (which must be free) to `to` and the answers back, for one
/// client at a time: what a device sees once a network carries UDP again.
async fn udp_forwarder(addr: SocketAddr, to: SocketAddr) {
    let front = UdpSocket::bind(addr).await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    let _ = back.send(&a[..n]).await;
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
}

/// The real `ward` daemon whose control session fell back to TCP (UDP to the coordinator not
/// answered) moves it back to QUIC once UDP gets through again, within its QUIC recheck
/// interval (2 s here; 30 s by default), and stays connected.
#[test]
fn a_device_on_tcp_moves_back_to_quic_when_udp_works_again() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "hana"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let coord: SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let (proxy, silent) = rt.block_on(udp_dead_tcp_proxy(coord));
    let mut tok = EnrollToken::parse(&c.token(&["--user", "hana"])).unwrap();
    tok.coordinator = proxy.to_string();

    let mut agent = Agent {
        state_dir: tmp.path().join("hana-state"),
        socket: tmp.path().join("hana.sock"),
        proc: None,
        extra: ["--tun", "off", "--quic-retry-secs", "2"]
            .map(String::from)
            .to_vec(),
    };
    agent.restart();
    let out = agent.up(&tok.encode(), "hana1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transport = |a: &Agent| a.status()["control_transport"].as_str().map(String::from);
    wait_until(
        "the control session over TCP",
        Duration::from_secs(15),
        || transport(&agent).as_deref() == Some("tcp"),
    );
    // Still on TCP after more than one recheck while UDP stays unanswered.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(transport(&agent).as_deref(), Some("tcp"));

    // UDP works again: the same port now forwards to the coordinator.
    drop(silent);
    rt.block_on(udp_forwarder(proxy, coord));
    let took = wait_until(
        "the control session back on QUIC",
        Duration::from_secs(10),
        || transport(&agent).as_deref() == Some("quic"),
    );
    eprintln!("back on QUIC {took:?} after UDP came back");
    assert!(
        took < Duration::from_secs(2) + TCP_HEAD_START + Duration::from_secs(3),
        "{took:?}"
    );
    let log = agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("QUIC reaches the coordinator again"), "{log}");
    // And it stays there.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(transport(&agent).as_deref(), Some("quic"));
    assert_eq!(agent.status()["state"], "connected");
}
