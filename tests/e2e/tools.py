#!/usr/bin/env python3
"""Helpers for Ward's end-to-end tests (stdlib only).

  tools.py pcap-check FILE MARKER PORT   verify a capture: UDP on PORT carries only WireGuard
                                         messages (types 1-4), and MARKER never appears
  tools.py garbage HOST PORT COUNT       send COUNT junk datagrams (random, truncated WireGuard)
  tools.py rss PID                       print VmRSS of PID in KiB
  tools.py serve PORT...                 TCP echo servers on PORTs (until killed)
  tools.py await HOST PORT open|closed T0_MS TIMEOUT_S
                                         probe HOST:PORT every 50 ms until a connection
                                         succeeds (open) or fails (closed); print the ms
                                         from T0_MS (epoch ms) to the start of that probe
  tools.py stream HOST PORT SECONDS      one TCP connection, a line every 50 ms; print the
                                         epoch ms of every echo received, one per line
  tools.py scan HOST FIRST LAST          try to connect to every port in FIRST..LAST
  tools.py synflood SRC DST FIRST LAST COUNT
                                         COUNT TCP SYNs from SRC (raw socket) to DST, ports
                                         FIRST..LAST in turn, source ports varied; print the
                                         seconds it took
  tools.py udp-log PORT FILE             append every UDP payload received on PORT (all
                                         addresses) to FILE, one per line (until killed)
  tools.py wg-send STATE PEER_PUB HOST PORT SRC [SRC2>]DST:DPORT...
                                         act as the device whose state file is STATE: a
                                         WireGuard handshake with the peer (base64 public key
                                         PEER_PUB) at HOST:PORT, then one inner UDP packet from
                                         SRC (or SRC2) to each DST:DPORT, payload `ward-DST`; prints
                                         `handshake ok` (needs python3-cryptography; the rest is
                                         stdlib only)
"""
import hashlib
import hmac
import os
import random
import socket
import struct
import sys
import threading
import time


def pcap_packets(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        endian = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        endian = ">"
    else:
        raise SystemExit(f"{path}: not a pcap file")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        yield linktype, data[off:off + incl]
        off += incl


def udp_payloads(path):
    """Yields (src_port, dst_port, payload) for IPv4 UDP packets."""
    for linktype, pkt in pcap_packets(path):
        if linktype == 1:  # Ethernet
            if len(pkt) < 14:
                continue
            ethertype = struct.unpack("!H", pkt[12:14])[0]
            if ethertype != 0x0800:
                continue
            ip = pkt[14:]
        elif linktype == 113:  # Linux cooked (SLL)
            if len(pkt) < 16 or struct.unpack("!H", pkt[14:16])[0] != 0x0800:
                continue
            ip = pkt[16:]
        elif linktype in (101, 12, 228):  # raw IP
            ip = pkt
        else:
            continue
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport = struct.unpack("!HH", udp[:4])
        yield sport, dport, udp[8:]


def pcap_check(path, marker, port):
    port = int(port)
    marker = marker.encode()
    with open(path, "rb") as f:
        raw = f.read()
    bad_marker = marker in raw
    n = 0
    types = {}
    bad = 0
    for sport, dport, payload in udp_payloads(path):
        if port not in (sport, dport):
            continue
        n += 1
        t = payload[0] if payload else -1
        types[t] = types.get(t, 0) + 1
        if not (len(payload) >= 4 and 1 <= payload[0] <= 4 and payload[1:4] == b"\0\0\0"):
            bad += 1
    print(f"wireguard datagrams: {n}, by type: {dict(sorted(types.items()))}, non-wireguard: {bad}, "
          f"plaintext marker seen: {bad_marker}")
    if n == 0:
        raise SystemExit("FAIL: no WireGuard traffic captured at all")
    if bad or bad_marker:
        raise SystemExit("FAIL: the underlay carried something other than WireGuard messages")


def garbage(host, port, count):
    port, count = int(port), int(count)
    rnd = random.Random(0x3A4D)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    templates = []
    for _ in range(256):
        kind = rnd.randrange(6)
        if kind == 0:
            b = os.urandom(rnd.randrange(1, 1400))
        elif kind == 1:  # truncated handshake initiation
            b = bytes([1, 0, 0, 0]) + os.urandom(rnd.randrange(0, 140))
        elif kind == 2:  # full-size handshake initiation with junk (fails MAC check)
            b = bytes([1, 0, 0, 0]) + os.urandom(144)
        elif kind == 3:  # handshake response / cookie with junk
            b = bytes([rnd.choice([2, 3]), 0, 0, 0]) + os.urandom(rnd.choice([88, 60, 20]))
        elif kind == 4:  # transport data for random receiver indexes
            b = bytes([4, 0, 0, 0]) + os.urandom(rnd.randrange(12, 1200))
        else:
            b = b""
        templates.append(b)
    sent = 0
    for i in range(count):
        try:
            s.sendto(templates[i & 255], (host, port))
            sent += 1
        except (BlockingIOError, OSError):
            pass
    print(f"sent {sent} garbage datagrams to {host}:{port}")


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                print(line.split()[1])
                return
    raise SystemExit("no VmRSS")


def hwm(pid):
    """Peak resident set size (VmHWM) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                print(line.split()[1])
                return
    raise SystemExit("no VmHWM")


def _echo(conn):
    with conn:
        while True:
            try:
                b = conn.recv(4096)
            except OSError:
                return
            if not b:
                return
            try:
                conn.sendall(b)
            except OSError:
                return


def _listen(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(128)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=_echo, args=(c,), daemon=True).start()


def serve(*ports):
    for p in ports:
        threading.Thread(target=_listen, args=(p,), daemon=True).start()
    while True:
        time.sleep(3600)


def _probe(host, port, timeout=0.3):
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as c:
            c.sendall(b"x")
            c.settimeout(timeout)
            return c.recv(1) == b"x"
    except OSError:
        return False


def await_state(host, port, want, t0_ms, timeout_s):
    want_open = want == "open"
    deadline = time.time() + float(timeout_s)
    while time.time() < deadline:
        start = time.time()
        if _probe(host, port) == want_open:
            print(int(start * 1000) - int(t0_ms))
            return
        time.sleep(max(0.0, 0.05 - (time.time() - start)))
    raise SystemExit(f"{host}:{port} never became {want} within {timeout_s} s")


def stream(host, port, seconds):
    c = socket.create_connection((host, int(port)), timeout=2)
    c.settimeout(0.05)
    end = time.time() + float(seconds)
    buf = b""
    while time.time() < end:
        try:
            c.sendall(b"ping\n")
        except OSError:
            pass
        try:
            buf += c.recv(4096)
        except socket.timeout:
            pass
        except OSError:
            break
        while b"\n" in buf:
            _, buf = buf.split(b"\n", 1)
            print(int(time.time() * 1000), flush=True)
        time.sleep(0.05)


def scan(host, first, last):
    refused = 0
    for port in range(int(first), int(last) + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.05)
        try:
            s.connect((host, port))
        except OSError:
            refused += 1
        finally:
            s.close()
    print(f"scanned {host} ports {first}-{last}: {refused} not open")


def _tcp_checksum(src, dst, seg):
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    data = pseudo + seg
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def synflood(src, dst, first, last, count):
    first, last, count = int(first), int(last), int(count)
    nports = last - first + 1
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    t0 = time.time()
    for i in range(count):
        dport = first + i % nports
        sport = 1024 + (i // nports) % 64000
        seg = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 5 << 4, 0x02, 65535, 0, 0)
        seg = seg[:16] + struct.pack("!H", _tcp_checksum(src, dst, seg)) + seg[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i & 0xFFFF, 0x4000, 64, 6, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        try:
            s.sendto(ip + seg, (dst, 0))
        except OSError:
            time.sleep(0.001)  # the TUN queue is full: let the agent catch up
        if i % 256 == 255:
            time.sleep(0.0005)
    print(f"{time.time() - t0:.1f}")


def udp_log(port, path):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    while True:
        data, _ = s.recvfrom(65535)
        with open(path, "ab") as f:
            f.write(data + b"\n")


# WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), initiator side, as the whitepaper gives it.
def _wg_hash(*parts):
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _wg_hmac(key, data):
    return hmac.new(key, data, hashlib.blake2s).digest()


def _wg_kdf(key, data, n):
    t0 = _wg_hmac(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = _wg_hmac(t0, prev + bytes([i]))
        out.append(prev)
    return out


def _ipv4_checksum(hdr):
    s = sum(struct.unpack("!10H", hdr))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def _udp4(src, dst, dport, payload):
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", _ipv4_checksum(hdr)) + hdr[12:]
    return hdr + udp


def wg_send(state_path, peer_pub_b64, host, port, src, *targets):
    import base64
    import json
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    with open(state_path) as f:
        s_priv = X25519PrivateKey.from_private_bytes(base64.b64decode(json.load(f)["wg_private_key"]))
    s_pub = s_priv.public_key().public_bytes(*raw)
    r_pub_b = base64.b64decode(peer_pub_b64)
    r_pub = X25519PublicKey.from_public_bytes(r_pub_b)
    aead = lambda k, n, pt, ad: ChaCha20Poly1305(k).encrypt(b"\0" * 4 + struct.pack("<Q", n), pt, ad)
    unaead = lambda k, n, ct, ad: ChaCha20Poly1305(k).decrypt(b"\0" * 4 + struct.pack("<Q", n), ct, ad)

    c = _wg_hash(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    h = _wg_hash(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    h = _wg_hash(h, r_pub_b)
    e_priv = X25519PrivateKey.generate()
    e_pub = e_priv.public_key().public_bytes(*raw)
    (c,) = _wg_kdf(c, e_pub, 1)
    h = _wg_hash(h, e_pub)
    c, k = _wg_kdf(c, e_priv.exchange(r_pub), 2)
    enc_static = aead(k, 0, s_pub, h)
    h = _wg_hash(h, enc_static)
    c, k = _wg_kdf(c, s_priv.exchange(r_pub), 2)
    now = time.time()
    # TAI64N as WireGuard implementations write it (2^62 + 37 + Unix seconds): later than the
    # device's own last handshake, so the peer does not take it for a replay.
    tai = struct.pack("!QI", (1 << 62) + 37 + int(now), int((now % 1) * 1e9))
    enc_ts = aead(k, 0, tai, h)
    h = _wg_hash(h, enc_ts)
    sender = random.getrandbits(32)
    msg = struct.pack("<I", 1) + struct.pack("<I", sender) + e_pub + enc_static + enc_ts
    mac1 = hashlib.blake2s(msg, digest_size=16, key=_wg_hash(b"mac1----", r_pub_b)).digest()
    msg += mac1 + b"\0" * 16

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    dest = (host, int(port))
    sock.sendto(msg, dest)
    while True:
        resp, _ = sock.recvfrom(2048)
        if len(resp) == 92 and resp[0] == 2 and struct.unpack("<I", resp[8:12])[0] == sender:
            break
    r_index = struct.unpack("<I", resp[4:8])[0]
    e_r = resp[12:44]
    (c,) = _wg_kdf(c, e_r, 1)
    h = _wg_hash(h, e_r)
    e_r_key = X25519PublicKey.from_public_bytes(e_r)
    (c,) = _wg_kdf(c, e_priv.exchange(e_r_key), 1)
    (c,) = _wg_kdf(c, s_priv.exchange(e_r_key), 1)
    c, tau, k = _wg_kdf(c, b"\0" * 32, 3)
    h = _wg_hash(h, tau)
    unaead(k, 0, resp[44:60], h)  # raises if the handshake failed
    t_send, _ = _wg_kdf(c, b"", 2)
    print("handshake ok")
    for n, target in enumerate(targets):
        inner_src = src
        if ">" in target:
            inner_src, target = target.split(">", 1)
        dst, dport = target.rsplit(":", 1)
        pkt = _udp4(inner_src, dst, int(dport), f"ward-{dst}".encode())
        pkt += b"\0" * (-len(pkt) % 16)
        data = struct.pack("<I", 4) + struct.pack("<I", r_index) + struct.pack("<Q", n)
        sock.sendto(data + aead(t_send, n, pkt, b""), dest)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"pcap-check": pcap_check, "garbage": garbage, "rss": rss, "hwm": hwm, "serve": serve,
     "await": await_state, "stream": stream, "scan": scan, "udp-log": udp_log,
     "synflood": synflood,
     "wg-send": wg_send}[cmd](*args)
