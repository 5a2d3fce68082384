#!/usr/bin/env python3
"""Sign a user in at the test OpenID provider exactly as a browser would (standard library only).

Device flow (RFC 8628): open the verification URI, enter/confirm the user code, fill the login
form, allow the consent page, and stop at the provider's success page:

    login.py device --uri 'https://IDP/device?user_code=ABCD-EFGH' --user alice --password PW [--mfa]
    login.py device --uri https://IDP/device --code ABCD-EFGH --user alice --password PW

Authorization code + PKCE (desktop flow): open the authorization URL the client built and follow
redirects until one points at the redirect URI; print that final URL (with code and state; with
--deny, Deny is pressed on the consent page and the URL carries error=access_denied):

    login.py code --url 'https://IDP/auth?client_id=...' --redirect-uri http://127.0.0.1:PORT/cb \
        --user alice --password PW [--mfa]

--mfa fills the one-time-code field (--otp, default $OIDC_MFA_CODE or 424242), so the sign-in's
`amr` is ["pwd","otp","mfa"]; without it `amr` is ["pwd"].
--ca-file CA.pem trusts the provider's throw-away CA. Exit status 0 on success; 1 with one clear
line on stderr when the provider refused (wrong password, disabled user, bad code, denied);
2 for usage or transport errors.
"""

import argparse
import html.parser
import http.cookiejar
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request


class Refused(Exception):
    """The provider answered, but did not let the sign-in through."""


class FormParser(html.parser.HTMLParser):
    """Collects forms (id, action, method, inputs), buttons bound to forms, and the error text."""

    def __init__(self):
        super().__init__()
        self.forms = {}
        self.order = []
        self.current = None
        self.body_id = None
        self.error = None
        self._in_error = False
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body_id = a.get("id")
        elif tag == "title":
            self._in_title = True
        elif tag == "form":
            fid = a.get("id") or f"form{len(self.order)}"
            self.forms[fid] = {
                "action": a.get("action") or "",
                "method": (a.get("method") or "get").lower(),
                "fields": [],
            }
            self.order.append(fid)
            self.current = fid
        elif tag == "input":
            fid = a.get("form") or self.current
            if fid in self.forms and a.get("name"):
                self.forms[fid]["fields"].append(
                    (a["name"], a.get("value") or "", (a.get("type") or "text").lower())
                )
        if a.get("id") == "error" or "red" in (a.get("class") or "").split():
            self._in_error = True
            self.error = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.current = None
        elif tag == "title":
            self._in_title = False
        elif tag == "p" and self._in_error:
            self._in_error = False

    def handle_data(self, data):
        if self._in_error:
            self.error = (self.error or "") + data
        if self._in_title:
            self.title += data


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Browser:
    def __init__(self, ca_file, insecure=False):
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(self.jar),
            NoRedirect(),
        )

    def request(self, url, data=None):
        """One request, no redirect following. Returns (status, location, url, body)."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        req.add_header("User-Agent", "ward-test-login/1 (python urllib)")
        req.add_header("Accept", "text/html")
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=15) as resp:
                return resp.status, resp.headers.get("Location"), url, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            return e.code, e.headers.get("Location"), url, text

    def walk(self, url, data=None, stop_at=None, max_hops=20):
        """Follow redirects (as a browser: 303/302 turn into GET). Stops at a URL that starts with
        stop_at and returns it instead of fetching it."""
        for _ in range(max_hops):
            if stop_at and url.startswith(stop_at):
                return None, url, ""
            status, location, cur, body = self.request(url, data)
            data = None
            if status in (301, 302, 303, 307, 308) and location:
                url = urllib.parse.urljoin(cur, location)
                continue
            return status, cur, body
        raise Refused("too many redirects")


def parse(body):
    p = FormParser()
    p.feed(body)
    return p


def submit(browser, page_url, form, values, stop_at=None):
    fields = []
    for name, value, typ in form["fields"]:
        if typ in ("submit", "button"):
            continue
        fields.append((name, values.get(name, value)))
    action = urllib.parse.urljoin(page_url, form["action"] or page_url)
    if form["method"] == "post":
        return browser.walk(action, dict(fields), stop_at=stop_at)
    sep = "&" if "?" in action else "?"
    return browser.walk(action + sep + urllib.parse.urlencode(fields), stop_at=stop_at)


def drive(browser, status, url, body, args, stop_at=None):
    """Answers the provider's pages until the device success page or the redirect URI."""
    otp = args.otp if args.mfa else ""
    code_entered = False
    for _ in range(12):
        if status is None:  # reached the redirect URI
            return url
        p = parse(body)
        if p.body_id == "device-success":
            return url
        if "op.deviceInputForm" in p.forms:
            if code_entered or p.error:
                raise Refused(f"user code refused: {(p.error or 'code not accepted').strip()}")
            if not args.code and not _code_in(url):
                raise Refused("the provider asks for a user code and none was given (--code)")
            code_entered = True
            values = {"user_code": args.code} if args.code else {}
            status, url, body = submit(browser, url, p.forms["op.deviceInputForm"], values, stop_at)
            continue
        if "op.deviceConfirmForm" in p.forms:
            status, url, body = submit(browser, url, p.forms["op.deviceConfirmForm"], {}, stop_at)
            continue
        if "login" in p.forms:
            if p.error:
                raise Refused(f"login refused: {p.error.strip()}")
            values = {"username": args.user, "password": args.password, "otp": otp}
            status, url, body = submit(browser, url, p.forms["login"], values, stop_at)
            p2 = parse(body) if status is not None else None
            if p2 is not None and "login" in p2.forms and p2.error:
                raise Refused(f"login refused (HTTP {status}): {p2.error.strip()}")
            continue
        if "consent" in p.forms:
            form = p.forms["abort"] if getattr(args, "deny", False) and "abort" in p.forms else p.forms["consent"]
            status, url, body = submit(browser, url, form, {}, stop_at)
            continue
        if p.title.strip() == "Submitting Callback" and len(p.order) == 1:
            # The provider's self-submitting form (a browser's script or Continue button posts it).
            status, url, body = submit(browser, url, p.forms[p.order[0]], {}, stop_at)
            continue
        if p.error is not None:
            raise Refused(f"provider error (HTTP {status}): {p.error.strip()}")
        raise Refused(f"unexpected page (HTTP {status}, {url}): {p.title.strip() or body[:200]!r}")
    raise Refused("too many pages without reaching the end of the sign-in")


def _code_in(url):
    return "user_code" in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)


def main():
    ap = argparse.ArgumentParser(description="Browser-like sign-in at the test OpenID provider")
    sub = ap.add_subparsers(dest="flow", required=True)
    for name in ("device", "code"):
        s = sub.add_parser(name)
        s.add_argument("--user", required=True)
        s.add_argument("--password", required=True)
        s.add_argument("--mfa", action="store_true", help="also enter the one-time code")
        s.add_argument("--otp", default=os.environ.get("OIDC_MFA_CODE", "424242"))
        s.add_argument("--ca-file", help="CA certificate (PEM) the provider's TLS cert chains to")
        if name == "device":
            s.add_argument("--uri", required=True, help="verification_uri(_complete)")
            s.add_argument("--code", help="user code, when --uri has none")
        else:
            s.add_argument("--url", required=True, help="the authorization request URL")
            s.add_argument("--redirect-uri", required=True)
            s.add_argument("--deny", action="store_true",
                           help="press Deny on the consent page; print the redirect carrying the error")
    args = ap.parse_args()
    browser = Browser(args.ca_file)
    try:
        if args.flow == "device":
            status, url, body = browser.walk(args.uri)
            drive(browser, status, url, body, args)
            print("device sign-in complete")
        else:
            status, url, body = browser.walk(args.url, stop_at=args.redirect_uri)
            final = drive(browser, status, url, body, args, stop_at=args.redirect_uri)
            if not final.startswith(args.redirect_uri):
                raise Refused(f"ended at {final}, not at the redirect URI")
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(final).query)
            if "error" in q and not args.deny:
                raise Refused(f"authorization error: {q['error'][0]} {q.get('error_description', [''])[0]}")
            print(final)
    except Refused as e:
        print(f"login.py: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"login.py: cannot reach the provider: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
