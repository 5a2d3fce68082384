#!/usr/bin/env python3
"""Command-line client of the test OpenID provider's admin API (python3 standard library only).

    admin.py [--url http://127.0.0.1:9444] [--token T] COMMAND ...
      wait [--timeout S]                 until the admin API answers (the provider is up)
      health | users | user SUB | sessions SUB
      disable SUB | enable SUB
      groups SUB [GROUP ...]             set the user's groups (none: empty list)
      logout SUB [--revoke-grants]       back-channel logout of the user's sessions
      scim SUB --active true|false       push a SCIM PATCH to the configured --scim-url
      tamper MODE [--grant-type G]       wrong_aud|wrong_iss|expired|alg_none|forged|replay|off

--url defaults to $OIDC_ADMIN_URL, --token to $OIDC_ADMIN_TOKEN. Prints the JSON answer on
stdout; exit 0 on a 2xx answer, 1 (one line on stderr) otherwise, 2 when unreachable.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def call(url, token, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    ap = argparse.ArgumentParser(description="admin API of tests/oidc/provider.mjs")
    ap.add_argument("--url", default=os.environ.get("OIDC_ADMIN_URL", "http://127.0.0.1:9444"))
    ap.add_argument("--token", default=os.environ.get("OIDC_ADMIN_TOKEN"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--timeout", type=float, default=15)
    sub.add_parser("health")
    sub.add_parser("users")
    for name in ("user", "sessions", "disable", "enable"):
        sub.add_parser(name).add_argument("sub")
    g = sub.add_parser("groups")
    g.add_argument("sub")
    g.add_argument("groups", nargs="*")
    lo = sub.add_parser("logout")
    lo.add_argument("sub")
    lo.add_argument("--revoke-grants", action="store_true")
    sc = sub.add_parser("scim")
    sc.add_argument("sub")
    sc.add_argument("--active", required=True, choices=["true", "false"])
    t = sub.add_parser("tamper")
    t.add_argument("mode")
    t.add_argument("--grant-type")
    a = ap.parse_args()
    if not a.token:
        print("admin.py: no --token (or $OIDC_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    q = urllib.parse.quote
    reqs = {
        "health": ("GET", "/admin/health", None),
        "users": ("GET", "/admin/users", None),
    }
    if a.cmd == "wait":
        end = time.time() + a.timeout
        while True:
            try:
                st, out = call(a.url, a.token, "GET", "/admin/health")
                if st == 200:
                    print(out.strip())
                    return 0
                print(f"admin.py: provider answered HTTP {st}: {out.strip()}", file=sys.stderr)
                return 1
            except (urllib.error.URLError, OSError) as e:
                if time.time() > end:
                    print(f"admin.py: provider admin API not up after {a.timeout}s: {e}", file=sys.stderr)
                    return 2
                time.sleep(0.1)
    if a.cmd in reqs:
        method, path, body = reqs[a.cmd]
    elif a.cmd == "user":
        method, path, body = "GET", f"/admin/users/{q(a.sub)}", None
    elif a.cmd == "sessions":
        method, path, body = "GET", f"/admin/users/{q(a.sub)}/sessions", None
    elif a.cmd in ("disable", "enable"):
        method, path, body = "POST", f"/admin/users/{q(a.sub)}/{a.cmd}", {}
    elif a.cmd == "groups":
        method, path, body = "PUT", f"/admin/users/{q(a.sub)}/groups", {"groups": a.groups}
    elif a.cmd == "logout":
        method, path, body = "POST", f"/admin/users/{q(a.sub)}/backchannel-logout", {"revoke_grants": a.revoke_grants}
    elif a.cmd == "scim":
        method, path, body = "POST", f"/admin/users/{q(a.sub)}/scim", {"active": a.active == "true"}
    else:  # tamper
        body = {"mode": a.mode}
        if a.grant_type:
            body["grant_type"] = a.grant_type
        method, path = "POST", "/admin/tamper"
    try:
        st, out = call(a.url, a.token, method, path, body)
    except (urllib.error.URLError, OSError) as e:
        print(f"admin.py: cannot reach {a.url}: {e}", file=sys.stderr)
        return 2
    print(out.strip())
    if not 200 <= st < 300:
        try:
            msg = json.loads(out).get("error") or out.strip()
        except ValueError:
            msg = out.strip()
        print(f"admin.py: {a.cmd}: HTTP {st}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
