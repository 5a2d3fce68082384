#!/usr/bin/env python3
"""Sign in to Ward's web console with the identity provider, as a browser would (standard
library only; the provider's pages are answered by login.py's driver).

    console_login.py --console http://127.0.0.1:8481 --user alice --password PW --ca-file CA.pem

GET /oidc/start (cookie + redirect to the provider), the provider's login and consent, then the
redirect to /oidc/callback with the attempt cookie; with a session cookie, GET /devices. Then the
same callback again (it must be refused: attempts work once) and once without the attempt
cookie (another browser: refused). Prints one JSON line:
{"callback": STATUS, "session": BOOL, "devices": STATUS, "replay": STATUS, "foreign": STATUS,
 "message": TEXT}. Exit status 0 when it ran (whatever the console decided), 2 on transport errors.
"""

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import login  # noqa: E402  (the provider-page driver)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirect())


def get(url, cookies=None):
    req = urllib.request.Request(url)
    if cookies:
        req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
    try:
        with OPENER.open(req, timeout=15) as r:
            return r.status, r.headers, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode("utf-8", "replace")


def set_cookies(headers):
    out = {}
    for h in headers.get_all("Set-Cookie") or []:
        k, _, rest = h.partition("=")
        v = rest.split(";", 1)[0]
        if v:
            out[k.strip()] = v
    return out


def message(body):
    m = re.search(r'<p id="(?:error|signed-in)">(.*?)</p>', body, re.S)
    return m.group(1).strip() if m else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--console", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--ca-file")
    a = ap.parse_args()
    try:
        status, headers, _ = get(a.console + "/oidc/start")
        if status != 303 or not headers.get("Location"):
            print(json.dumps({"start": status}))
            return 1
        attempt = set_cookies(headers)
        browser = login.Browser(a.ca_file)
        redirect_uri = a.console + "/oidc/callback"
        args = argparse.Namespace(user=a.user, password=a.password, mfa=False, otp="", code=None, deny=False)
        st, url, body = browser.walk(headers["Location"], stop_at=redirect_uri)
        final = login.drive(browser, st, url, body, args, stop_at=redirect_uri)
        status, headers, body = get(final, attempt)
        session = set_cookies(headers).get("ward_console")
        devices = get(a.console + "/devices", {"ward_console": session})[0] if session else None
        replay = get(final, attempt)[0]
        foreign = get(final)[0]
        print(json.dumps({"callback": status, "session": bool(session), "devices": devices,
                          "replay": replay, "foreign": foreign, "message": message(body)}))
    except login.Refused as e:
        print(json.dumps({"provider_refused": str(e)}))
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"console_login.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
