//! Replays every fuzz corpus input (`fuzz/corpus/TARGET/*`) through the same target bodies the
//! fuzzers run (`fuzz/src/lib.rs`), on the stable toolchain: an input that once crashed a
//! parser, or that the fuzzers kept for reaching new code, must keep passing. Each target's
//! corpus must exist and hold inputs, so a lost corpus fails here instead of passing empty.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod bodies;

use std::path::PathBuf;

/// A fuzz target body.
type Body = fn(&[u8]);

/// Every fuzz target, by its folder name under `fuzz/corpus/`.
const TARGETS: &[(&str, Body)] = &[
    ("control_frames", bodies::control_frames),
    ("relay_protocol", bodies::relay_protocol),
    ("tokens_and_names", bodies::tokens_and_names),
    ("policy", bodies::policy),
    ("posture_report", bodies::posture_report),
    ("packets", bodies::packets),
    ("state_file", bodies::state_file),
    ("enrollment_csr", bodies::enrollment_csr),
    ("lease", bodies::lease),
    ("dns_query", bodies::dns_query),
];

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_fuzz_target_has_a_corpus_and_every_input_replays() {
    let mut total = 0;
    for (name, body) in TARGETS {
        let dir = corpus_dir().join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= 2,
            "corpus {} holds {} inputs; the fuzzers' corpus belongs in the repository",
            dir.display(),
            inputs.len()
        );
        for p in &inputs {
            let data = std::fs::read(p).unwrap();
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(run.is_ok(), "{name}: input {} panics", p.display());
        }
        total += inputs.len();
        eprintln!("{name}: {} inputs replayed", inputs.len());
    }
    eprintln!("{total} corpus inputs replayed");
}

#[test]
fn every_fuzz_target_is_replayed() {
    // A target added to fuzz/fuzz_targets/ without a line above would never run in CI.
    let dir = corpus_dir().join("../fuzz_targets");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    found.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

/// Not a check: writes the hand-made seed inputs each fuzz target starts from (valid messages,
/// signed tickets and leases, real certificate requests, the lab's policies). Run by hand with
/// `cargo test -p ward-tests --test fuzz_corpus -- --ignored write_seed_inputs`, then let the
/// fuzzers grow the corpus from them.
#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_inputs() {
    use ward_shared::wire::{self, CoordinatorMsg, DeviceId, DeviceMsg};
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };

    // Control frames: golden messages, framed, with a piece-size byte in front.
    let device = [
        r#"{"type":"hello","protocol":1,"os":"debian 12","wg_public_key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=","wg_port":51820,"local_endpoints":["192.168.1.2:51820"]}"#,
        r#"{"type":"enroll","protocol":1,"token_id":"0102030405060708","token_secret":"CQkJ","hostname":"laptop","os":"debian","csr_der":"AQID"}"#,
        r#"{"type":"denied_flows","flows":[{"src":"100.64.0.9","proto":"tcp","port":22,"count":3}]}"#,
        r#"{"type":"update","wg_port":1,"home_relay":"r2"}"#,
        r#"{"type":"relay_ticket_request"}"#,
    ];
    let coord = [
        r#"{"type":"netmap_delta","base_seq":1,"seq":2,"upsert":[{"device_id":3,"hostname":"h3","ipv4":"100.64.0.3","ipv6":"fd00::3","relay":"r1"}]}"#,
        r#"{"type":"posture_verdict","evaluated_at_ms":5,"results":[{"requirement":"baseline","passed":false,"failures":["file /x: missing"]}],"quarantine":null}"#,
        r#"{"type":"error","code":"token_used","message":"token already used"}"#,
    ];
    let mut all = vec![3u8];
    for (i, m) in device.iter().enumerate() {
        let msg: DeviceMsg = wire::decode(m.as_bytes()).unwrap();
        let mut f = vec![(i as u8) * 37 + 1];
        f.extend(wire::encode(&msg));
        all.extend(wire::encode(&msg));
        write("control_frames", &format!("device-{i}"), &f);
    }
    for (i, m) in coord.iter().enumerate() {
        let msg: CoordinatorMsg = wire::decode(m.as_bytes()).unwrap();
        let mut f = vec![255u8];
        f.extend(wire::encode(&msg));
        all.extend(wire::encode(&msg));
        write("control_frames", &format!("coordinator-{i}"), &f);
    }
    write("control_frames", "all-in-pieces", &all);
    write("control_frames", "oversized", &[1, 0, 0, 0x20, 0, b'{']);

    // Relay: a signed ticket, a device hello carrying it, datagrams, discovery.
    use ward_shared::relay::{self, Ticket};
    let ticket = Ticket {
        device_id: DeviceId(7),
        cert_identity: [9u8; 32],
        not_before_ms: 1_000,
        not_after_ms: 601_000,
        serial: 3,
    }
    .sign(&key);
    write(
        "relay_protocol",
        "ticket",
        &serde_json::to_vec(&ticket).unwrap(),
    );
    let hello = relay::DeviceToRelay::Hello {
        protocol: 1,
        ticket: ticket.clone(),
    };
    write(
        "relay_protocol",
        "hello",
        &serde_json::to_vec(&hello).unwrap(),
    );
    write(
        "relay_protocol",
        "datagram",
        &relay::encode_datagram(DeviceId(5), &[4, 0, 0, 0, 1, 2, 3]),
    );
    let req = ward_shared::discovery::BindingRequest { txid: [1; 12] };
    write("relay_protocol", "binding-request", &req.encode());
    let resp = ward_shared::discovery::BindingResponse {
        txid: [1; 12],
        observed: "[2001:db8::1]:41641".parse().unwrap(),
    };
    write("relay_protocol", "binding-response", &resp.encode());
    write(
        "relay_protocol",
        "load",
        br#"{"type":"load","devices":2,"bytes_relayed":10,"datagrams_relayed":1,"dropped":0}"#,
    );

    // Strings.
    let token = ward_shared::token::EnrollToken {
        coordinator: "[fd00:77::1]:7443".into(),
        alternates: vec!["10.0.0.2:7443".into()],
        ca_sha256: [5; 32],
        id: [6; ward_shared::token::TOKEN_ID_LEN],
        secret: ward_shared::secret::Secret::new(vec![8; 32]),
    };
    write("tokens_and_names", "token", token.encode().as_bytes());
    let cred = ward_shared::relay::RelayCredential {
        coordinator: "10.0.0.1:7443".into(),
        ca_sha256: [5; 32],
        name: "r1".into(),
        secret: ward_shared::secret::Secret::new(vec![8; 32]),
    };
    write(
        "tokens_and_names",
        "relay-credential",
        cred.encode().as_bytes(),
    );
    write("tokens_and_names", "duration", b"90s");
    write(
        "tokens_and_names",
        "hostname",
        "Alice's MacBook Pro".as_bytes(),
    );

    // Policies: the lab's own files.
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/policies");
    for e in std::fs::read_dir(policies).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_str().unwrap().to_string();
        write("policy", &name, &std::fs::read(&p).unwrap());
    }

    // A posture report with every signal unknown but one file.
    let report = ward_shared::posture::PostureReport::unknown(DeviceId(7), 1, 1_800_000_000_000)
        .with_file("/etc/ward/marker", true);
    write(
        "posture_report",
        "unknown",
        &serde_json::to_vec(&report).unwrap(),
    );
    let golden = r#"{"device_id":7,"seq":1800000000000,"collected_at_ms":1800000000000}"#;
    write("posture_report", "minimal", golden.as_bytes());

    // Packets: [direction+time, length, packet]…: an outbound SYN, its SYN-ACK, an inbound
    // SYN to the allowed port, an IPv6 echo request.
    let tcp4 = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8| {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p
    };
    let me = [100, 64, 0, 1];
    let peer = [100, 64, 0, 2];
    let mut pk = Vec::new();
    for (ctl, p) in [
        (0u8, tcp4(me, peer, 40000, 8080, 0x02)),
        (1, tcp4(peer, me, 8080, 40000, 0x12)),
        (3, tcp4(peer, me, 50000, 22, 0x02)),
        (1, tcp4(peer, me, 50001, 23, 0x02)),
    ] {
        pk.push(ctl);
        pk.push(p.len() as u8);
        pk.extend(p);
    }
    let mut echo6 = vec![0x60, 0, 0, 0, 0, 8, 58, 64];
    echo6.extend("fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    echo6.extend("fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    echo6.extend([128, 0, 0, 0, 0, 1, 0, 1]);
    pk.push(1);
    pk.push(echo6.len() as u8);
    pk.extend(&echo6);
    write("packets", "flows", &pk);
    write(
        "packets",
        "echo6",
        &[&[1u8, echo6.len() as u8][..], &echo6].concat(),
    );

    // A state file as `ward up` writes it.
    let st = ward_client::state::State {
        version: 1,
        coordinator: "10.0.0.1:7443".into(),
        coordinators: vec!["10.0.0.1:7443".into(), "10.0.0.2:7443".into()],
        ca_der: wire::Bytes(vec![1, 2, 3]),
        device_id: DeviceId(7),
        hostname: "laptop".into(),
        ipv4: "100.64.0.7".parse().unwrap(),
        ipv6: "fd00::7".parse().unwrap(),
        identity_key_pem: "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n".into(),
        cert_der: wire::Bytes(vec![4, 5, 6]),
        cert_not_after_ms: 1_800_000_000_000,
        wg_private_key: wire::Bytes(vec![7; 32]),
        enabled: true,
        lease_key: wire::Bytes(vec![8; 32]),
        routes: Default::default(),
    };
    write(
        "state_file",
        "enrolled",
        &serde_json::to_vec_pretty(&st).unwrap(),
    );
    write("state_file", "empty-object", b"{}");

    // Certificate requests and certificates.
    write("enrollment_csr", "csr", &ward_client::control::test_csr());
    let k = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["device.ward.internal".into()])
        .unwrap()
        .self_signed(&k)
        .unwrap();
    write("enrollment_csr", "cert", cert.der());

    // A signed lease.
    let lease = ward_shared::lease::Lease {
        device_id: DeviceId(7),
        wg_public_key: wire::WgPublicKey([3; 32]),
        ipv4: "100.64.0.7".parse().unwrap(),
        ipv6: "fd00::7".parse().unwrap(),
        not_before_ms: 1_000,
        not_after_ms: 601_000,
        serial: 11,
    }
    .sign(&key);
    write("lease", "signed", &serde_json::to_vec(&lease).unwrap());
    write("lease", "unsigned", br#"{"device_id":7,"signature":""}"#);
}
