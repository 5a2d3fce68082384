#!/usr/bin/env python3
"""dns.sh's probe of a device's resolver: rcodes over UDP and TCP, then garbage (truncated,
oversized, compression loops, random bytes, 100 000 random names), then a last good query.
Usage: dns_probe.py RESOLVER_IP DB_IP. Exits non-zero on the first wrong answer."""
import os
import random
import socket
import struct
import sys
import time

SERVER, DB = sys.argv[1], sys.argv[2]
ADDR = (SERVER, 53)


def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def query(qid, n, qtype=1):
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name(n) + struct.pack(">HH", qtype, 1)


def skip_name(b, i):
    while True:
        ln = b[i]
        if ln == 0:
            return i + 1
        if ln & 0xC0 == 0xC0:
            return i + 2
        i += 1 + ln


def parse(b):
    """(id, rcode, [answer addresses]) of a reply."""
    qid, flags, qd, an = struct.unpack(">HHHH", b[:8])
    i = 12
    for _ in range(qd):
        i = skip_name(b, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(b, i)
        t, _c, _ttl, ln = struct.unpack(">HHIH", b[i : i + 10])
        i += 10
        rd = b[i : i + ln]
        i += ln
        if t == 1:
            addrs.append(socket.inet_ntop(socket.AF_INET, rd))
        elif t == 28:
            addrs.append(socket.inet_ntop(socket.AF_INET6, rd))
    return qid, flags & 0xF, addrs


def udp(n, qtype=1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    qid = random.randrange(65536)
    s.sendto(query(qid, n, qtype), ADDR)
    b, _ = s.recvfrom(65535)
    got = parse(b)
    assert got[0] == qid, f"{n}: id {got[0]} != {qid}"
    return got[1:]


def tcp(n, qtype=1):
    s = socket.create_connection(ADDR, timeout=3)
    q = query(4242, n, qtype)
    s.sendall(struct.pack(">H", len(q)) + q)
    ln = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
    b = s.recv(ln, socket.MSG_WAITALL)
    s.close()
    return parse(b)[1:]


def expect(what, got, want):
    if got != want:
        print(f"FAIL {what}: got {got}, want {want}")
        sys.exit(1)
    print(f"ok   {what}: {got}")


expect("A db.ward.internal (udp)", udp("db.ward.internal"), (0, [DB]))
rc, v6 = udp("db.ward.internal", 28)
expect("AAAA db.ward.internal has one IPv6 address", (rc, len(v6), ":" in v6[0]), (0, 1, True))
expect("A secret.ward.internal (udp) is NXDOMAIN", udp("secret.ward.internal"), (3, []))
expect("A pg.ward.internal (tcp)", tcp("pg.ward.internal"), (0, [DB]))
expect("A nobody.ward.internal (tcp) is NXDOMAIN", tcp("nobody.ward.internal"), (3, []))

# An oversized TCP length: the connection is closed, nothing read past it.
s = socket.create_connection(ADDR, timeout=3)
s.sendall(struct.pack(">H", 65000) + b"x" * 100)
try:
    closed = s.recv(10) == b""
except ConnectionResetError:  # closed with our unread bytes still queued: a reset
    closed = True
s.close()
expect("oversized TCP message closes the connection", closed, True)

g = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
g.setblocking(False)
answers = 0


def drain():
    global answers
    while True:
        try:
            g.recv(65535)
            answers += 1
        except BlockingIOError:
            return


def send(b):
    try:
        g.sendto(b, ADDR)
    except BlockingIOError:
        time.sleep(0.001)
    drain()


good = query(7, "db.ward.internal")
sent = 0
for n in range(len(good)):  # every truncation
    send(good[:n])
    sent += 1
send(b"\0" * 5000)  # oversized
send(struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01")  # loop on itself
loop2 = struct.pack(">HHHHHH", 2, 0x0100, 1, 0, 0, 0) + b"\x01a\xc0\x0e\xc0\x0c\x00\x01\x00\x01"
send(loop2)  # two pointers at each other
sent += 3
rnd = random.Random(18)
for _ in range(1000):
    send(os.urandom(rnd.randrange(1, 600)))
    sent += 1
t = time.time()
for i in range(100_000):
    label = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(rnd.randrange(1, 30)))
    label = label.strip("-") or "x"
    send(query(i & 0xFFFF, f"{label}.ward.internal", rnd.choice((1, 28))))
    sent += 1
time.sleep(0.5)
drain()
print(f"garbage: {sent} messages sent, {answers} answers received, 100000 names in {time.time() - t:.1f}s")
expect("A db.ward.internal after the garbage", udp("db.ward.internal"), (0, [DB]))
