#!/usr/bin/env python3
"""Self-test of the test OpenID provider (tests/oidc), on loopback only.

Starts provider.mjs with a throw-away CA, then plays a relying party with the standard library and
python3-cryptography: device authorization, login.py, token polling, ID token verification (iss,
aud, exp, signature against the JWKS), refresh (rotation and reuse), userinfo, introspection,
revocation, groups change, disable/enable, back-channel logout and a SCIM PATCH delivered to a
small HTTPS listener, every ID token tamper mode, authorization code + PKCE, and key rotation.
Prints `N passed, N failed`; exit status 0 only when nothing failed.
"""

import base64
import hashlib
import http.server
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_ID = "ward-selftest"
CLIENT_SECRET = secrets.token_urlsafe(24)
ADMIN_TOKEN = secrets.token_urlsafe(24)
SCIM_TOKEN = secrets.token_urlsafe(24)
MFA_CODE = "135790"
ALG = os.environ.get("OIDC_SELFTEST_ALG", "RS256")  # signing algorithm of the generated keys
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

LOGIN_ID_TOKENS = []  # ID tokens of every device-flow login in this run
PASSED = 0
FAILED = 0


def check(name, cond, detail=""):
    global PASSED, FAILED
    if cond:
        PASSED += 1
        print(f"ok   {name}")
    else:
        FAILED += 1
        print(f"FAIL {name} {detail}")
    return cond


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def jwt_parts(tok):
    h, p, s = tok.split(".")
    return json.loads(b64d(h)), json.loads(b64d(p)), b64d(s) if s else b"", f"{h}.{p}".encode()


def verify_sig(tok, jwks):
    """True when the JWT's signature verifies with the JWKS key its kid names."""
    header, _, sig, signing_input = jwt_parts(tok)
    keys = [k for k in jwks["keys"] if k.get("kid") == header.get("kid")]
    if not keys or header.get("alg") not in ("RS256", "ES256"):
        return False
    k = keys[0]
    try:
        if header["alg"] == "RS256" and k["kty"] == "RSA":
            pub = rsa.RSAPublicNumbers(
                int.from_bytes(b64d(k["e"]), "big"), int.from_bytes(b64d(k["n"]), "big")
            ).public_key()
            pub.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if header["alg"] == "ES256" and k["kty"] == "EC":
            pub = ec.EllipticCurvePublicNumbers(
                int.from_bytes(b64d(k["x"]), "big"), int.from_bytes(b64d(k["y"]), "big"), ec.SECP256R1()
            ).public_key()
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            pub.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
            return True
    except InvalidSignature:
        return False
    return False


class RP:
    """The relying party side: plain HTTPS calls to the provider."""

    def __init__(self, issuer, ca_file):
        self.issuer = issuer
        self.ctx = ssl.create_default_context(cafile=ca_file)
        self.disc = self.get_json(f"{issuer}/.well-known/openid-configuration")[1]
        self.jwks = self.get_json(self.disc["jwks_uri"])[1]

    def call(self, url, data=None, headers=None, method=None, basic=True):
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method=method)
        if basic and data is not None:
            cred = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            req.add_header("Authorization", f"Basic {cred}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def get_json(self, url, **kw):
        st, body = self.call(url, **kw)
        try:
            return st, json.loads(body)
        except ValueError:
            return st, {"raw": body}

    def post_json(self, url, data, **kw):
        return self.get_json(url, data=data, **kw)

    def device_start(self, scope="openid email profile groups offline_access", nonce=None):
        data = {"scope": scope}
        if nonce:
            data["nonce"] = nonce
        return self.post_json(self.disc["device_authorization_endpoint"], data)

    def token(self, data):
        return self.post_json(self.disc["token_endpoint"], data)

    def refresh(self, rt):
        return self.token({"grant_type": "refresh_token", "refresh_token": rt})

    def userinfo(self, at):
        return self.get_json(self.disc["userinfo_endpoint"], headers={"Authorization": f"Bearer {at}"})

    def id_token_ok(self, tok, now=None):
        """Verification a relying party does: signature, iss, aud, exp. Returns (ok, claims)."""
        try:
            header, claims, _, _ = jwt_parts(tok)
        except (ValueError, KeyError):
            return False, {}
        now = now or time.time()
        ok = (
            verify_sig(tok, self.jwks)
            and claims.get("iss") == self.issuer
            and (claims.get("aud") == CLIENT_ID or CLIENT_ID in (claims.get("aud") or []))
            and claims.get("exp", 0) > now
        )
        return ok, claims


class Sink:
    """HTTPS listener standing in for the coordinator: back-channel logout and SCIM."""

    def __init__(self, cert, key):
        self.events = []
        self.cond = threading.Condition()
        sink = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode()
                with sink.cond:
                    sink.events.append(
                        {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )
                    sink.cond.notify_all()
                if self.command == "PATCH":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/scim+json")
                    out = json.dumps({"id": self.path.rsplit("/", 1)[-1]}).encode()
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            do_POST = _record
            do_PATCH = _record

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, method, timeout=5):
        end = time.time() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e["method"] == method:
                        self.events.remove(e)
                        return e
                left = end - time.time()
                if left <= 0:
                    return None
                self.cond.wait(left)


class Provider:
    def __init__(self, tmp, issuer, port, admin_port, sink_port, jwks):
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log = open(os.path.join(tmp, "provider.log"), "ab")
        cmd = [
            "node", os.path.join(HERE, "provider.mjs"),
            "--issuer", issuer, "--listen", f"127.0.0.1:{port}",
            "--tls-cert", os.path.join(tmp, "server.pem"), "--tls-key", os.path.join(tmp, "server.key"),
            "--jwks", jwks, "--users", os.path.join(tmp, "users.json"),
            "--client-id", CLIENT_ID,
            "--redirect-uri", "http://127.0.0.1/callback",
            "--backchannel-logout-uri", f"https://127.0.0.1:{sink_port}/oidc/backchannel-logout",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--scim-url", f"https://127.0.0.1:{sink_port}/scim/v2",
            "--rp-ca-file", os.path.join(tmp, "ca.pem"),
        ]
        env = dict(os.environ, OIDC_CLIENT_SECRET=CLIENT_SECRET, OIDC_ADMIN_TOKEN=ADMIN_TOKEN,
                   OIDC_SCIM_TOKEN=SCIM_TOKEN, OIDC_MFA_CODE=MFA_CODE)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.ready = None
        end = time.time() + 15
        while time.time() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.write(line)
            self.log.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "ready":
                self.ready = ev
                break
        if not self.ready:
            raise SystemExit(f"provider did not start; see {self.log.name}")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()

    def api(self, method, path, body=None, token=ADMIN_TOKEN):
        data = json.dumps(body).encode() if body is not None else (b"" if method != "GET" else None)
        req = urllib.request.Request(self.admin + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def admin_cli(prov, *args):
    """admin.py, as the e2e scripts call it. Returns (exit status, stdout + stderr)."""
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "admin.py"), "--url", prov.admin, *args],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, OIDC_ADMIN_TOKEN=ADMIN_TOKEN),
    )
    return p.returncode, p.stdout + p.stderr


def run_login(rp, args, ca):
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "login.py"), *args, "--ca-file", ca],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, OIDC_MFA_CODE=MFA_CODE),
    )
    return p.returncode, p.stdout + p.stderr


def device_login(rp, ca, user, password, mfa=False, nonce=None, scope=None):
    """A whole device flow; returns (token response, device authorization response)."""
    st, da = rp.device_start(nonce=nonce, **({"scope": scope} if scope else {}))
    if st != 200:
        return None, da
    args = ["device", "--uri", da["verification_uri_complete"], "--user", user, "--password", password]
    if mfa:
        args.append("--mfa")
    rc, out = run_login(rp, args, ca)
    if rc != 0:
        return None, {"login": out}
    for _ in range(20):
        st, tok = rp.token({"grant_type": DEVICE_GRANT, "device_code": da["device_code"]})
        if st == 200:
            LOGIN_ID_TOKENS.append(tok.get("id_token"))
            return tok, da
        if tok.get("error") not in ("authorization_pending", "slow_down"):
            return None, tok
        time.sleep(da.get("interval", 1) if tok.get("error") == "slow_down" else 0.2)
    return None, {"error": "timeout"}


def main():
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="oidc-selftest.")
    subprocess.run([os.path.join(HERE, "mkcert.sh"), tmp, "127.0.0.1"], check=True)
    ca = os.path.join(tmp, "ca.pem")
    jwks1 = os.path.join(tmp, "jwks1.json")
    subprocess.run(["node", os.path.join(HERE, "genjwks.mjs"), jwks1, "--alg", ALG],
                   check=True, capture_output=True)
    users = [
        {"sub": "u-alice", "username": "alice", "password": "alice-pw", "email": "alice@example.test",
         "groups": ["eng"], "active": True, "mfa": True},
        {"sub": "u-bob", "username": "bob", "password": "bob-pw", "email": "bob@example.test",
         "groups": ["ops"], "active": False, "mfa": False},
        {"sub": "u-carol", "username": "carol", "password": "carol-pw", "email": "carol@example.test",
         "groups": [], "active": True, "mfa": False},
    ]
    with open(os.path.join(tmp, "users.json"), "w") as f:
        json.dump(users, f)
    sink = Sink(os.path.join(tmp, "server.pem"), os.path.join(tmp, "server.key"))
    port, admin_port = free_port(), free_port()
    issuer = f"https://127.0.0.1:{port}"
    prov = Provider(tmp, issuer, port, admin_port, sink.port, jwks1)
    try:
        body(tmp, ca, issuer, port, admin_port, sink, prov, jwks1)
    finally:
        prov.stop()
    if FAILED:
        print(f"selftest runtime {time.time() - t0:.1f}s; provider log kept: {tmp}/provider.log")
    else:
        print(f"selftest runtime {time.time() - t0:.1f}s")
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{PASSED} passed, {FAILED} failed")
    return 0 if FAILED == 0 else 1


def body(tmp, ca, issuer, port, admin_port, sink, prov, jwks1):
    rp = RP(issuer, ca)
    d = rp.disc
    check("discovery: issuer and device/userinfo/revocation/introspection endpoints",
          d.get("issuer") == issuer and all(k in d for k in (
              "device_authorization_endpoint", "userinfo_endpoint", "revocation_endpoint",
              "introspection_endpoint")) and d.get("backchannel_logout_supported") is True, json.dumps(d)[:300])

    # --- admin API is guarded
    st, _ = prov.api("GET", "/admin/users", token="wrong")
    check("admin API refuses a wrong bearer token (401)", st == 401, st)
    rc, out = admin_cli(prov, "wait", "--timeout", "5")
    rc2, out2 = admin_cli(prov, "disable", "u-nobody")
    check("admin.py: wait succeeds; an unknown user exits 1 with the reason",
          rc == 0 and rc2 == 1 and "no user with sub u-nobody" in out2, (out, out2))

    # --- device flow: pending, wrong password, MFA login, token
    st, da = rp.device_start(nonce="nonce-device-1")
    check("device authorization returns user_code, verification_uri_complete, interval 1",
          st == 200 and "user_code" in da and "verification_uri_complete" in da and da.get("interval") == 1, da)
    st, pend = rp.token({"grant_type": DEVICE_GRANT, "device_code": da["device_code"]})
    check("polling before sign-in: authorization_pending", st == 400 and pend.get("error") == "authorization_pending", pend)
    rc, out = run_login(rp, ["device", "--uri", da["verification_uri_complete"], "--user", "alice",
                             "--password", "nope"], ca)
    check("login.py: wrong password exits non-zero with a clear message",
          rc == 1 and "Invalid username or password" in out, out)
    rc, out = run_login(rp, ["device", "--uri", da["verification_uri_complete"], "--user", "alice",
                             "--password", "alice-pw"], ca)
    check("a user code confirmed once cannot be entered again (already used)",
          rc == 1 and "already used" in out, out)
    st, da = rp.device_start(nonce="nonce-device-1")
    rc, out = run_login(rp, ["device", "--uri", da["verification_uri"], "--code", da["user_code"],
                             "--user", "alice", "--password", "alice-pw", "--mfa"], ca)
    check("login.py: device flow with URI + code and --mfa succeeds", rc == 0, out)
    tok = None
    for _ in range(20):
        st, tok = rp.token({"grant_type": DEVICE_GRANT, "device_code": da["device_code"]})
        if st == 200:
            break
        time.sleep(0.2)
    LOGIN_ID_TOKENS.append(tok.get("id_token"))
    ok, c = rp.id_token_ok(tok.get("id_token", ""))
    check(f"device token response: ID token verifies (signature, iss, aud, exp; {ALG})",
          ok and jwt_parts(tok["id_token"])[0].get("alg") == ALG, tok)
    check("ID token carries email, preferred_username, groups, auth_time, sid",
          c.get("email") == "alice@example.test" and c.get("preferred_username") == "alice"
          and c.get("groups") == ["eng"] and isinstance(c.get("auth_time"), int) and c.get("sid"), c)
    check("--mfa sign-in: amr contains mfa", "mfa" in (c.get("amr") or []), c.get("amr"))
    print(f"info device flow nonce sent=nonce-device-1 echoed={c.get('nonce')!r}")
    check("device token response has a refresh token", "refresh_token" in tok, tok)

    st, pend = rp.token({"grant_type": DEVICE_GRANT, "device_code": da["device_code"]})
    check("device code is single-use (invalid_grant on second redemption)", pend.get("error") == "invalid_grant", pend)
    st, ui = rp.userinfo(tok["access_token"])
    check("redeeming a device code twice revokes what it issued (userinfo 401)", st == 401, (st, ui))
    tok, info = device_login(rp, ca, "alice", "alice-pw", mfa=True)
    check("a fresh device-flow login (--mfa)", tok is not None and "mfa" in rp.id_token_ok(tok["id_token"])[1].get("amr", []), info)
    tok = tok or {}
    _, c = rp.id_token_ok(tok.get("id_token", ""))
    login1 = tok

    # --- userinfo, introspection
    st, ui = rp.userinfo(tok["access_token"])
    check("userinfo: 200 with sub, email, groups", st == 200 and ui.get("sub") == "u-alice"
          and ui.get("groups") == ["eng"] and ui.get("email") == "alice@example.test", (st, ui))
    st, intro = rp.post_json(d["introspection_endpoint"], {"token": tok["access_token"]})
    check("introspection: access token active", st == 200 and intro.get("active") is True, intro)

    # --- refresh: rotation, reuse
    st, r1 = rp.refresh(tok["refresh_token"])
    ok, c1 = rp.id_token_ok(r1.get("id_token", ""))
    check("refresh: new tokens, a rotated refresh token, ID token verifies",
          st == 200 and ok and r1.get("refresh_token") not in (None, tok["refresh_token"]), r1)
    check("refresh keeps amr and auth_time of the sign-in", c1.get("amr") == c.get("amr")
          and c1.get("auth_time") == c.get("auth_time"), (c1, c))
    st, reuse = rp.refresh(tok["refresh_token"])
    check("reusing a rotated refresh token: invalid_grant", st == 400 and reuse.get("error") == "invalid_grant", reuse)
    st, after = rp.refresh(r1["refresh_token"])
    check("reuse revokes the whole grant: the newest refresh token fails too",
          st == 400 and after.get("error") == "invalid_grant", after)

    # --- a plain password login: amr ["pwd"]; groups change; disable/enable
    tok, info = device_login(rp, ca, "alice", "alice-pw")
    ok, c = rp.id_token_ok((tok or {}).get("id_token", ""))
    check("sign-in without --mfa: amr is [\"pwd\"]", ok and c.get("amr") == ["pwd"], (tok, info))
    login2 = tok or {}
    rt = login2.get("refresh_token", "")
    rc, out = admin_cli(prov, "groups", "u-alice", "eng", "admins")
    st = 200 if rc == 0 else rc
    st2, r = rp.refresh(rt)
    ok, c = rp.id_token_ok(r.get("id_token", ""))
    check("admin set groups: next refresh's ID token has the new groups",
          st == 200 and st2 == 200 and ok and c.get("groups") == ["eng", "admins"], (st, r))
    rt, at = r.get("refresh_token", rt), r.get("access_token", "")
    st, ui = rp.userinfo(at)
    check("userinfo shows the new groups", st == 200 and ui.get("groups") == ["eng", "admins"], ui)

    rc, out = admin_cli(prov, "disable", "u-alice")
    st = 200 if rc == 0 and '"active":false' in out else out
    st2, r = rp.refresh(rt)
    check("disabled user: refresh gets invalid_grant", st == 200 and st2 == 400 and r.get("error") == "invalid_grant", r)
    st, ui = rp.userinfo(at)
    check("disabled user: userinfo gets 401 invalid_token", st == 401 and ui.get("error") == "invalid_token", (st, ui))
    st, da = rp.device_start()
    rc, out = run_login(rp, ["device", "--uri", da["verification_uri_complete"], "--user", "alice",
                             "--password", "alice-pw"], ca)
    check("login.py: disabled user exits non-zero with a clear message", rc == 1 and "disabled" in out, out)
    st, _ = prov.api("POST", "/admin/users/u-alice/enable")
    st2, r = rp.refresh(rt)
    check("re-enabled user: the same refresh token works again", st == 200 and st2 == 200 and "id_token" in r, r)
    rt = r.get("refresh_token", rt)

    # --- revocation
    st, _ = rp.call(d["revocation_endpoint"], data={"token": rt, "token_type_hint": "refresh_token"})
    st2, r = rp.refresh(rt)
    check("revoked refresh token: invalid_grant", st == 200 and st2 == 400 and r.get("error") == "invalid_grant", (st, r))

    # --- MFA without enrolment; carol logs in
    st, da = rp.device_start()
    rc, out = run_login(rp, ["device", "--uri", da["verification_uri_complete"], "--user", "carol",
                             "--password", "carol-pw", "--mfa"], ca)
    check("login.py --mfa for a user without a second factor fails", rc == 1 and "one-time code" in out, out)

    # --- back-channel logout to the listener
    tok, _ = device_login(rp, ca, "carol", "carol-pw")
    _, cc = rp.id_token_ok((tok or {}).get("id_token", ""))
    st, out = prov.api("POST", "/admin/users/u-carol/backchannel-logout", {})
    ev = sink.wait("POST")
    lt = urllib.parse.parse_qs(ev["body"]).get("logout_token", [""])[0] if ev else ""
    ok = False
    lc = {}
    if lt:
        lh, lc, _, _ = jwt_parts(lt)
        ok = (verify_sig(lt, rp.jwks) and lc.get("iss") == issuer and lc.get("aud") == CLIENT_ID
              and lc.get("sub") == "u-carol" and lc.get("sid") == cc.get("sid")
              and "http://schemas.openid.net/event/backchannel-logout" in (lc.get("events") or {})
              and "nonce" not in lc and lc.get("jti") and lh.get("typ") == "logout+jwt")
    check("back-channel logout delivered: signed logout_token with iss, aud, sub, sid, events, jti",
          st == 200 and ev is not None and ev["path"] == "/oidc/backchannel-logout" and ok, (st, out, lc))
    print(f"info logout_token claims: {sorted(lc)}")
    st, out = prov.api("POST", "/admin/users/u-carol/backchannel-logout", {})
    check("back-channel logout with no session left: 502 and nothing sent", st == 502 and out.get("sessions") == []
          and sink.wait("POST", timeout=0.3) is None, (st, out))
    st, r = rp.refresh((tok or {}).get("refresh_token", ""))
    check("device-flow refresh token survives the logout (no revoke_grants)", st == 200, r)

    # --- SCIM push
    st, out = prov.api("POST", "/admin/users/u-carol/scim", {"active": False})
    ev = sink.wait("PATCH")
    ok = False
    if ev:
        b = json.loads(ev["body"])
        ok = (ev["path"] == "/scim/v2/Users/u-carol"
              and ev["headers"].get("authorization") == f"Bearer {SCIM_TOKEN}"
              and b.get("schemas") == ["urn:ietf:params:scim:api:messages:2.0:PatchOp"]
              and b.get("Operations") == [{"op": "replace", "value": {"active": False}}])
    check("SCIM PATCH /scim/v2/Users/{sub} delivered with bearer token and PatchOp body", st == 200 and ok, (st, out, ev))

    # --- tamper modes (armed through the admin API; applied to the next token response)
    tok, _ = device_login(rp, ca, "alice", "alice-pw")
    rt = (tok or {}).get("refresh_token", "")
    now = time.time()

    def tampered(mode):
        nonlocal rt
        st, _ = prov.api("POST", "/admin/tamper", {"mode": mode})
        s2, r = rp.refresh(rt)
        rt = r.get("refresh_token", rt)
        return st == 200 and s2 == 200, r.get("id_token", "")

    ok, t = tampered("wrong_aud")
    _, c, _, _ = jwt_parts(t)
    check("tamper wrong_aud: valid signature, aud is not the client",
          ok and verify_sig(t, rp.jwks) and c.get("aud") != CLIENT_ID and c.get("iss") == issuer, c)
    ok, t = tampered("wrong_iss")
    _, c, _, _ = jwt_parts(t)
    check("tamper wrong_iss: valid signature, iss is not the issuer",
          ok and verify_sig(t, rp.jwks) and c.get("iss") != issuer and c.get("aud") == CLIENT_ID, c)
    ok, t = tampered("expired")
    _, c, _, _ = jwt_parts(t)
    check("tamper expired: valid signature, exp in the past", ok and verify_sig(t, rp.jwks) and c.get("exp", 1e12) < now, c)
    ok, t = tampered("alg_none")
    h, c, sig, _ = jwt_parts(t)
    check("tamper alg_none: header alg none, empty signature", ok and h.get("alg") == "none" and sig == b""
          and c.get("aud") == CLIENT_ID, h)
    ok, t = tampered("forged")
    h, c, _, _ = jwt_parts(t)
    check("tamper forged: same kid as the JWKS, signature does not verify",
          ok and h.get("kid") == rp.jwks["keys"][0]["kid"] and not verify_sig(t, rp.jwks)
          and c.get("aud") == CLIENT_ID and c.get("iss") == issuer, h)
    ok, t = tampered("replay")
    print(f"info replay candidates={len(LOGIN_ID_TOKENS)} replayed_is_known={t in LOGIN_ID_TOKENS}")
    check("tamper replay: the ID token of an earlier login (other sid), validly signed",
          ok and t in LOGIN_ID_TOKENS and t != tok.get("id_token") and verify_sig(t, rp.jwks)
          and jwt_parts(t)[1].get("sid") != jwt_parts(tok["id_token"])[1].get("sid")
          and jwt_parts(t)[1].get("sub") == "u-alice", t[:40])
    s2, r = rp.refresh(rt)
    ok, c = rp.id_token_ok(r.get("id_token", ""))
    check("tamper modes are one-shot: the following token response is clean", s2 == 200 and ok, r)
    rt = r.get("refresh_token", rt)
    # one mode through a device-flow login as well (the login path, not only refresh)
    prov.api("POST", "/admin/tamper", {"mode": "wrong_aud", "grant_type": DEVICE_GRANT})
    s2, r = rp.refresh(rt)
    ok_refresh, _ = rp.id_token_ok(r.get("id_token", ""))
    tok, _ = device_login(rp, ca, "alice", "alice-pw")
    _, c, _, _ = jwt_parts((tok or {}).get("id_token", "x.e30.x"))
    check("tamper with grant_type filter: skips refresh, hits the device-code token response",
          ok_refresh and c.get("aud") == "not-ward-client", c)

    # --- authorization code + PKCE to a loopback redirect (desktop flow)
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    q = urllib.parse.urlencode({
        "client_id": CLIENT_ID, "response_type": "code", "scope": "openid email groups offline_access",
        "redirect_uri": redirect, "state": "st-1", "nonce": "nonce-code-1", "prompt": "consent",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    rc, out = run_login(rp, ["code", "--url", f"{d['authorization_endpoint']}?{q}", "--redirect-uri", redirect,
                             "--user", "alice", "--password", "alice-pw", "--mfa"], ca)
    final = out.strip().splitlines()[-1] if out.strip() else ""
    qs = urllib.parse.parse_qs(urllib.parse.urlsplit(final).query)
    check("login.py code: ends at the loopback redirect URI with code and state",
          rc == 0 and final.startswith(redirect) and qs.get("state") == ["st-1"] and "code" in qs, out)
    st, tok = rp.token({"grant_type": "authorization_code", "code": qs.get("code", [""])[0],
                        "redirect_uri": redirect, "code_verifier": verifier})
    ok, c = rp.id_token_ok(tok.get("id_token", ""))
    check("code + PKCE: ID token verifies, nonce echoed, amr has mfa, refresh token issued",
          st == 200 and ok and c.get("nonce") == "nonce-code-1" and "mfa" in (c.get("amr") or [])
          and "refresh_token" in tok, (st, tok, c))
    st, bad = rp.token({"grant_type": "authorization_code", "code": "x", "redirect_uri": redirect,
                        "code_verifier": verifier})
    check("token endpoint rejects a bogus code (invalid_grant)", bad.get("error") == "invalid_grant", bad)

    # --- key rotation: restart with a JWKS whose new key comes first
    jwks2 = os.path.join(tmp, "jwks2.json")
    subprocess.run(["node", os.path.join(HERE, "genjwks.mjs"), jwks2, "--prepend-to", jwks1, "--alg", ALG],
                   check=True, capture_output=True)
    old_kid = rp.jwks["keys"][0]["kid"]
    prov.stop()
    prov2 = Provider(tmp, issuer, port, admin_port, sink.port, jwks2)
    try:
        rp2 = RP(issuer, ca)
        kids = [k["kid"] for k in rp2.jwks["keys"]]
        tok, _ = device_login(rp2, ca, "alice", "alice-pw")
        h, _, _, _ = jwt_parts((tok or {}).get("id_token", "e30.e30."))
        ok, _ = rp2.id_token_ok((tok or {}).get("id_token", ""))
        check("key rotation: JWKS publishes new and old keys, the new key signs",
              len(kids) == 2 and kids[1] == old_kid and h.get("kid") == kids[0] != old_kid and ok, (kids, h))
    finally:
        prov2.stop()


if __name__ == "__main__":
    sys.exit(main())
