#!/usr/bin/python3
"""Drives the web console in headless Chromium (Selenium) for tests/e2e/console.sh.

Runs inside the coordinator's network namespace (the console listens on its loopback).
Usage: console_driver.py LINK_URL ARTIFACT_DIR
Environment (shell commands run with bash -c; each exits 0 or not):
  CONSOLE_REACH  the quarantine subject reaching its peer (ping/nc from a peer)
  CONSOLE_SUBJECT  the device the browser quarantines and releases
  CONSOLE_PEER  another device shown as active
Prints `PASS what` / `FAIL what` lines; exits 1 if any check failed.
"""
import http.cookiejar
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.support.ui import WebDriverWait

LINK, ART = sys.argv[1], sys.argv[2]
SUBJECT = os.environ["CONSOLE_SUBJECT"]
PEER = os.environ["CONSOLE_PEER"]
REACH = os.environ["CONSOLE_REACH"]
BASE = LINK.split("/login")[0]
failed = 0


def check(what, ok, detail=""):
    global failed
    if ok:
        print(f"PASS {what}", flush=True)
    else:
        failed += 1
        print(f"FAIL {what} {detail}", flush=True)


def wait(pred, timeout=20.0, interval=0.3):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if pred():
                return True
        except Exception:  # a page mid-load: try again
            pass
        time.sleep(interval)
    return False


def reach():
    return subprocess.run(["bash", "-c", REACH], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def goto(drv, path, title):
    """Opens a console page and waits until it is the one shown (by its title)."""
    drv.get(BASE + path)
    WebDriverWait(drv, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.title.startswith(title + " ·")
        and d.execute_script("return document.readyState") == "complete")


def state_of(drv, name):
    goto(drv, "/devices", "Devices")
    for row in drv.find_elements(By.CSS_SELECTOR, "#devices tbody tr"):
        if row.find_element(By.CSS_SELECTOR, "a.device-name").text == name:
            return row.find_element(By.CSS_SELECTOR, ".state").get_attribute("data-state")
    return None


def row_button(drv, name, cls):
    for row in drv.find_elements(By.CSS_SELECTOR, "table tbody tr"):
        if row.find_elements(By.CSS_SELECTOR, "td")[0].text.startswith(name):
            return row.find_element(By.CSS_SELECTOR, f"form.{cls} button")
    raise LookupError(f"no {cls} button for {name}")


def submit(drv, button):
    """Clicks a form's button and waits for the page it leads to (a navigation started by the
    click would be cancelled by the next drv.get)."""
    drv.execute_script("window.__ward_before = true")
    button.click()
    WebDriverWait(drv, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__ward_before === undefined && document.readyState === 'complete'"))


def shot(drv, name):
    path = os.path.join(ART, name + ".png")
    drv.save_screenshot(path)
    return path


def http(method, path, headers=None, data=None):
    req = urllib.request.Request(BASE + path, method=method, headers=headers or {},
                                 data=data.encode() if data else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


opts = webdriver.ChromeOptions()
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
          "--window-size=1400,1000", "--no-first-run", "--user-data-dir=" + os.path.join(os.environ.get("HOME", "/tmp"), "chrome-profile")):
    opts.add_argument(a)
drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
drv.set_page_load_timeout(20)
try:
    # Sign in with the one-time link: redirected to the devices page, cookie set.
    drv.get(LINK)
    check("the one-time link signs in (devices page)", drv.current_url.endswith("/devices")
          and drv.find_elements(By.ID, "devices"), drv.current_url)
    cookies = {c["name"]: c for c in drv.get_cookies()}
    c = cookies.get("ward_console", {})
    check("session cookie is HttpOnly and SameSite=Strict",
          c.get("httpOnly") is True and c.get("sameSite") == "Strict", str(c))
    check(f"{SUBJECT} and {PEER} listed as active",
          state_of(drv, SUBJECT) == "active" and state_of(drv, PEER) == "active")
    check("posture column rendered", "Posture" in drv.find_element(By.ID, "devices").text)
    shot(drv, "devices")

    # Quarantine from the console: the subject's access vanishes in the lab.
    check(f"{SUBJECT} reaches its peer before quarantine", wait(reach, 15))
    goto(drv, "/devices", "Devices")
    t0 = time.time()
    submit(drv, row_button(drv, SUBJECT, "quarantine"))
    check("quarantine shown on the devices page", wait(lambda: state_of(drv, SUBJECT) == "quarantined", 10))
    blocked = wait(lambda: not reach(), 20, 0.2)
    check(f"{SUBJECT}'s access is gone after the console's quarantine ({time.time() - t0:.1f}s)", blocked)
    shot(drv, "quarantined")
    goto(drv, "/quarantine", "Quarantine")
    check("quarantine page lists it", SUBJECT in drv.find_element(By.ID, "quarantine").text)
    submit(drv, row_button(drv, SUBJECT, "release"))
    t0 = time.time()
    check("release shown", wait(lambda: state_of(drv, SUBJECT) == "active", 10))
    check(f"{SUBJECT}'s access is back after release", wait(reach, 30, 0.3),
          f"after {time.time() - t0:.1f}s")

    # The flow graph and the maturity chart render as SVG.
    goto(drv, "/graph?since=1h", "Flow graph")
    nodes = drv.find_elements(By.CSS_SELECTOR, "#flow-graph g.node")
    allowed = drv.find_elements(By.CSS_SELECTOR, "#flow-graph line.edge-allowed")
    denied = drv.find_elements(By.CSS_SELECTOR, "#flow-graph line.edge-denied")
    check(f"flow graph: {len(nodes)} nodes, {len(allowed)} allowed and {len(denied)} denied edges",
          len(nodes) >= 2 and len(allowed) >= 1 and len(denied) >= 1)
    print("screenshot " + shot(drv, "graph"))
    goto(drv, "/maturity", "Maturity")
    lines = drv.find_elements(By.CSS_SELECTOR, "#maturity-chart polyline.series")
    points = drv.find_elements(By.CSS_SELECTOR, "#maturity-chart circle.point")
    check(f"maturity chart: {len(lines)} pillar lines, {len(points)} points",
          len(lines) == 6 and len(points) >= 12)
    print("screenshot " + shot(drv, "maturity"))
    goto(drv, "/policy?from=1&to=2", "Policy")
    check("policy diff between versions 1 and 2",
          len(drv.find_elements(By.CSS_SELECTOR, "#policy-diff .add")) >= 1)
    goto(drv, "/grants", "Grants")
    gtext = drv.find_element(By.TAG_NAME, "main").text
    check("grant listed with time left", "59m" in gtext or "60m" in gtext,
          f"at {drv.current_url}: {gtext[:300]!r}")
    goto(drv, "/audit", "Audit log")
    v = drv.find_element(By.ID, "audit-verify")
    check("audit chain verified on the audit page", "pass" in v.get_attribute("class"), v.text)
    check("console sign-in and quarantine audited",
          "console.login" in drv.page_source and "device.quarantine" in drv.page_source
          and "console.link" in drv.page_source)
    shot(drv, "audit")

    # Refusals, over plain HTTP.
    sid = c.get("value", "")
    csrf = drv.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    origin = {"Origin": BASE, "Content-Type": "application/x-www-form-urlencoded"}
    st, _ = http("GET", "/devices")
    check(f"GET without a session refused ({st})", st == 401)
    st, _ = http("POST", "/quarantine", origin, urllib.parse.urlencode({"csrf": csrf, "name": PEER}))
    check(f"POST without a session refused ({st})", st == 401)
    st, body = http("POST", "/quarantine", dict(origin, Cookie="ward_console=" + sid),
                    urllib.parse.urlencode({"csrf": "0" * 64, "name": PEER}))
    check(f"POST with a wrong CSRF token refused ({st})", st == 403 and "CSRF" in body)
    st, _ = http("POST", "/quarantine", {"Cookie": "ward_console=" + sid, "Origin": "http://evil.example",
                                         "Content-Type": "application/x-www-form-urlencoded"},
                 urllib.parse.urlencode({"csrf": csrf, "name": PEER}))
    check(f"POST from another origin refused ({st})", st == 403)
    st, _ = http("POST", "/quarantine", dict(origin, Cookie="ward_console=" + sid),
                 "csrf=" + csrf + "&name=" + "x" * 20000)
    check(f"oversized POST refused ({st})", st == 413)
    check(f"{PEER} untouched by the refused requests", state_of(drv, PEER) == "active")
    st, hdrs = 0, None
    with urllib.request.urlopen(urllib.request.Request(BASE + "/static/console.css"), timeout=5) as r:
        hdrs = r.headers
    check("security headers (CSP, no framing, nosniff)",
          "default-src 'self'" in hdrs.get("Content-Security-Policy", "")
          and hdrs.get("X-Frame-Options") == "DENY" and hdrs.get("X-Content-Type-Options") == "nosniff")

    # A used link is refused (in a fresh browser state: no cookie).
    drv.delete_all_cookies()
    drv.get(LINK)
    # Whatever the answer, wait until it (not the audit page before it) is shown.
    wait(lambda: not drv.title.startswith("Audit log"), 10)
    body = drv.find_element(By.TAG_NAME, "body").text
    check("a reused one-time link is refused",
          "already used" in body and not drv.find_elements(By.ID, "devices"),
          f"at {drv.current_url}: {drv.title!r} {body[:300]!r}")
    st, _ = http("GET", LINK[len(BASE):])
    check(f"a reused link over HTTP is refused ({st})", st == 403)
except Exception as e:  # a missing element or a timeout: the remaining checks did not run
    check("driver ran to the end", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
finally:
    drv.quit()
sys.exit(1 if failed else 0)
