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
  replicas_measure.py posture COORD_CMD... -- WARD_CMD... -- MARK DEVICE
      removes the posture file MARK (DEVICE's posture then fails on the replica holding its
      session) and times until DEVICE leaves the watcher's netmap (the watcher is on another
      replica); then also from the `device.trust` audit row that replica wrote (COORD_CMD
      reads the one audit log) to the watcher's change: the cross-replica part alone. Then
      puts MARK back and times until DEVICE is back.
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


def trust_row_ms(coord, device, failing):
    """ts_ms of the newest `device.trust` row for DEVICE whose verdict fails (or passes)."""
    r = subprocess.run(coord + ["audit", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    try:
        rows = json.loads(r.stdout)
        rows = rows.get("entries", rows) if isinstance(rows, dict) else rows
    except ValueError:
        return None
    best = None
    for e in rows:
        if e.get("action") != "device.trust" or e.get("target") != device:
            continue
        if bool(e.get("detail", {}).get("failing")) != failing:
            continue
        if best is None or e["ts_ms"] > best:
            best = e["ts_ms"]
    return best


def posture(coord, ward, mark, device):
    import os
    if peers(ward) is None or device not in peers(ward):
        print(f"{device} is not in the watcher's netmap to begin with")
        return 1
    rc = 0
    for failing in (True, False):
        t0 = time.monotonic()
        if failing:
            os.remove(mark)
        else:
            open(mark, "w").close()
        ok = wait_until(ward, (lambda p: device not in p) if failing else (lambda p: device in p))
        seen_ms = time.time() * 1000
        ms = (time.monotonic() - t0) * 1000
        what = "fails" if failing else "passes again"
        if not ok:
            print(f"{device}'s posture {what}: not seen by the watcher within {TIMEOUT_S} s")
            rc = 1
            continue
        row = trust_row_ms(coord, device, failing)
        cross = f"{seen_ms - row:.0f}" if row is not None else "?"
        print(f"{device}'s posture {what}: watcher's netmap changed {ms:.0f} ms after the file"
              f" changed, {cross} ms after the holding replica stored the verdict")
        key = "FAIL" if failing else "BACK"
        print(f"POSTURE_{key}_MS={ms:.0f} CROSS_{key}_MS={cross}")
    return rc


def main():
    mode = sys.argv[1]
    parts = split(sys.argv[2:])
    if mode == "applies":
        n = int(parts[0][0])
        return applies(n, parts[0][1:], parts[1], *parts[2])
    if mode == "gone":
        return gone(parts[0], parts[1], *parts[2])
    if mode == "posture":
        return posture(parts[0], parts[1], *parts[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
