#!/usr/bin/env python3
"""replicas.sh's clock: applies policies on one replica and times how long until a device
connected to ANOTHER replica sees the change in its netmap (polling its agent socket), and times
a revoke made on one replica until the device's peer on the other replica loses it.

usage:
  replicas_measure.py applies N COORD_CMD... -- WARD_CMD... -- OPEN CLOSED PEER
      COORD_CMD runs `policy apply FILE` (the replica to apply on); WARD_CMD runs `status
      --json` on the watching device; OPEN/CLOSED are policy files with and without access
      between the watcher and PEER. Alternates CLOSED, OPEN, ... N times; prints one latency
      per apply and p50/p99; exits 1 if any apply was not seen within the timeout.
  replicas_measure.py gone COORD_CMD... -- WARD_CMD... -- DEVICE PEER
      runs `device revoke DEVICE` with COORD_CMD and times until PEER's netmap loses it.
"""
import json
import subprocess
import sys
import time

TIMEOUT_S = 5.0


def split(args):
    out, cur = [], []
    for a in args:
        if a == "--":
            out.append(cur)
            cur = []
        else:
            cur.append(a)
    out.append(cur)
    return out


def peers(ward):
    r = subprocess.run(ward + ["status", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    try:
        return {p["hostname"] for p in json.loads(r.stdout).get("peers", [])}
    except (ValueError, KeyError):
        return None


def wait_until(ward, pred):
    t0 = time.monotonic()
    while time.monotonic() - t0 < TIMEOUT_S:
        p = peers(ward)
        if p is not None and pred(p):
            return True
        time.sleep(0.01)
    return False


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * q))]


def applies(n, coord, ward, open_, closed, peer):
    lat = []
    for i in range(n):
        closing = i % 2 == 0
        f = closed if closing else open_
        t0 = time.monotonic()
        r = subprocess.run(coord + ["policy", "apply", f], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"apply {i + 1} failed: {r.stderr.strip()}")
            return 1
        ok = wait_until(ward, (lambda p: peer not in p) if closing else (lambda p: peer in p))
        ms = (time.monotonic() - t0) * 1000
        if not ok:
            print(f"apply {i + 1}: change not seen within {TIMEOUT_S} s")
            return 1
        lat.append(ms)
        print(f"    apply {i + 1:2} ({'close' if closing else 'open '}): {ms:6.0f} ms")
    print(f"policy apply -> other replica's device: p50 {pct(lat, 0.5):.0f} ms, p99 {pct(lat, 0.99):.0f} ms, max {max(lat):.0f} ms over {n}")
    print(f"P50_MS={pct(lat, 0.5):.0f} P99_MS={pct(lat, 0.99):.0f}")
    return 0


def gone(coord, ward, device, peer_of):
    if peers(ward) is None or device not in peers(ward):
        print(f"{device} is not in the watcher's netmap to begin with")
        return 1
    t0 = time.monotonic()
    r = subprocess.run(coord + ["device", "revoke", device], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"revoke failed: {r.stderr.strip()}")
        return 1
    ok = wait_until(ward, lambda p: device not in p)
    ms = (time.monotonic() - t0) * 1000
    print(f"revoke on one replica -> gone from {peer_of}'s netmap on the other: {ms:.0f} ms")
    print(f"REVOKE_MS={ms:.0f}")
    return 0 if ok else 1


def main():
    mode = sys.argv[1]
    parts = split(sys.argv[2:])
    if mode == "applies":
        n = int(parts[0][0])
        return applies(n, parts[0][1:], parts[1], *parts[2])
    if mode == "gone":
        return gone(parts[0], parts[1], *parts[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
