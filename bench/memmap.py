#!/usr/bin/env python3
"""Where a process's resident memory is: /proc/PID/smaps grouped by what each mapping holds.

    python3 bench/memmap.py PID [--json]

Categories (Rss in KiB; root needed for other users' processes):
  file:NAME      file-backed pages (the binary's code and data, shared libraries)
  stack:THREAD   a thread's stack, found by the stack pointer in /proc/PID/task/TID/syscall
                 (a thread running on a CPU at that instant shows as "anon" instead)
  heap           the main malloc arena ([heap], grown with brk)
  arena          other anonymous read-write mappings of 64 MiB-aligned malloc arenas
                 (glibc gives threads their own arena; they are 64 MiB reservations)
  anon           every other anonymous mapping (large mmap'd allocations, runtime areas)
  vdso/vvar/...  kernel-provided pages
Also each file mapping on its own ("segments_kib": NAME PERMS @OFFSET -> Rss and the
Anonymous part, pages a write or a relocation made private), and Rss, Pss, Anonymous totals and VmHWM from /proc/PID/status.
"""
import json
import os
import re
import sys

ARENA = 64 << 20


def mappings(pid):
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) \S+ (\d+)\s*(.*)$", line)
            if m:
                if cur:
                    yield cur
                cur = {
                    "start": int(m.group(1), 16),
                    "end": int(m.group(2), 16),
                    "perms": m.group(3),
                    "offset": int(m.group(4), 16),
                    "inode": int(m.group(5)),
                    "name": m.group(6).strip(),
                }
                continue
            k, _, v = line.partition(":")
            v = v.strip()
            if v.endswith(" kB"):
                cur[k] = int(v[:-3])
    if cur:
        yield cur


def thread_sps(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{tid}/syscall").read().split()
        except OSError:
            continue
        # "NR a0..a5 SP PC" while in a syscall; "-1 SP PC" when blocked otherwise; "running"
        if len(f) >= 3 and f[0] != "running":
            out.append((int(f[-2], 16), name))
    return out


def breakdown(pid):
    sps = thread_sps(pid)
    cats = {}
    segs = {}
    tot = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    # arena heaps start at a 64 MiB boundary: the mappings of one arena share (start // ARENA)
    maps = list(mappings(pid))
    arena_bases = {
        m["start"] // ARENA
        for m in maps
        if m["inode"] == 0 and not m["name"] and m["start"] % ARENA == 0
    }
    for m in maps:
        for k in tot:
            tot[k] += m.get(k, 0)
        rss = m.get("Rss", 0)
        name = m["name"]
        if m["inode"] != 0 or name.startswith("/"):
            cat = "file:" + os.path.basename(name)
            if m.get("Rss", 0):
                seg = "%s %s @%x" % (os.path.basename(name), m["perms"], m["offset"])
                segs[seg] = {"rss": m.get("Rss", 0), "anonymous": m.get("Anonymous", 0)}
        elif name == "[heap]":
            cat = "heap"
        elif name.startswith("["):
            cat = name.strip("[]").split(":")[0]
        else:
            owners = sorted({t for sp, t in sps if m["start"] <= sp < m["end"]})
            if owners:
                cat = "stack:" + ",".join(owners)
            elif m["start"] // ARENA in arena_bases:
                cat = "arena"
            else:
                cat = "anon"
        cats[cat] = cats.get(cat, 0) + rss
    hwm = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return {"categories_kib": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "segments_kib": segs, "total_kib": tot, "vmhwm_kib": hwm, "threads": len(sps)}


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    b = breakdown(int(sys.argv[1]))
    if "--json" in sys.argv[2:]:
        print(json.dumps(b))
        return
    for k, v in b["categories_kib"].items():
        if v:
            print(f"{k:40s} {v:8d} KiB")
    print("file mappings:")
    for k, v in b["segments_kib"].items():
        print(f"  {k:38s} {v['rss']:8d} KiB  (Anonymous {v['anonymous']} KiB)")
    t = b["total_kib"]
    print(f"{'total Rss':40s} {t['Rss']:8d} KiB  (Anonymous {t['Anonymous']} KiB, Pss {t['Pss']} KiB)")
    print(f"{'VmHWM':40s} {b['vmhwm_kib']:8d} KiB  ({b['threads']} threads)")


if __name__ == "__main__":
    main()
