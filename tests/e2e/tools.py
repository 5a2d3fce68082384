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
"""
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


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"pcap-check": pcap_check, "garbage": garbage, "rss": rss, "serve": serve,
     "await": await_state, "stream": stream, "scan": scan}[cmd](*args)
