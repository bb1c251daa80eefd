"""A real browser uploads straight to imgworker (issue 23): Debian's chromium,
headless, driven by chromium-driver and python3-selenium, loads a web app's
page (tests/integration/browser/upload.html) from the app's own backend, a
server on another origin than imgworker's nginx. The page gets an upload
grant from that backend, POSTs a photo through nginx with fetch() (a CORS
preflight first), polls the job and shows the thumbnail; the test reads the
image's natural width from the DOM. The same page from an origin not in
``[auth] cors_origins`` is stopped by the browser, and nothing is stored.

Without chromium, chromedriver or selenium these tests skip on a laptop and
FAIL under CI=true (script/bootstrap installs them).
"""

import http.server
import json
import os
import re
import threading

import pytest
import requests

from harness import samples
from harness.pipeline import free_port, wait_until

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:     # reported by _unavailable()
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browser", "upload.html")
OWNER = "browser-user-1"
PHOTO = samples.jpeg(1200, 900)


def _unavailable():
    if webdriver is None:
        return "needs selenium (Debian's python3-selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"needs {path} (Debian's {package})"
    return None


@pytest.fixture
def browser():
    """Headless chromium. --no-sandbox: CI runs the tests as root, and
    chromium's sandbox refuses root."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test {reason} (script/bootstrap installs it)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", "--window-size=800,600"):
        options.add_argument(argument)
    # the console (CORS errors are reported there), for failure messages
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class AppBackend:
    """The web app's backend, on 127.0.0.1:port: it serves the page and the
    photo the page uploads, and at POST /grant asks imgworker for an upload
    grant with the app's key (scope grant), as a real app's server would,
    keeping the key away from the browser. It records the grants it got."""

    def __init__(self, port, api_base, key):
        self.origin = f"http://127.0.0.1:{port}"
        self.api_base = api_base
        self.grants = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] == "/upload.html":
                    with open(PAGE, "rb") as handle:
                        self.answer(200, "text/html; charset=utf-8", handle.read())
                elif self.path == "/photo.jpg":
                    self.answer(200, "image/jpeg", PHOTO)
                else:
                    self.answer(404, "text/plain", b"not here\n")

            def do_POST(self):
                if self.path != "/grant":
                    return self.answer(404, "text/plain", b"not here\n")
                granted = requests.post(backend.api_base + "/grants", json={"owner": OWNER},
                                        headers={"Authorization": f"Bearer {key}"}, timeout=10)
                backend.grants.append(granted)
                self.answer(granted.status_code, "application/json", granted.content)

            def answer(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def page_url(self, host="127.0.0.1"):
        return f"http://{host}:{self.server.server_address[1]}/upload.html?api={self.api_base}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app(make_pipeline):
    """A pipeline with auth required whose cors_origins lists the app
    backend's origin (its port picked first, as the config names it), nginx
    with the shipped site in front, and the app's backend with a key of scope
    grant. Yields (pipeline, backend, another), ``another`` being the same
    backend on a port cors_origins does not list."""
    port = free_port()
    pipeline = make_pipeline(auth={"required": "true", "cors_origins": f"http://127.0.0.1:{port}"})
    pipeline.start_api()
    pipeline.start_worker()
    pipeline.start_nginx()
    key = pipeline.add_key("app-backend", "grant")
    backends = [AppBackend(port, pipeline.nginx.base_url, key),
                AppBackend(free_port(), pipeline.nginx.base_url, key)]
    yield pipeline, *backends
    for backend in backends:
        backend.close()


def logged_requests(nginx):
    """(method, path, status) of each request in nginx's access log (the
    default combined format), in order."""
    with open(nginx.access_log) as handle:
        return [(method, path, int(status)) for method, path, status in
                re.findall(r'"(\S+) (\S+) [^"]*" (\d{3}) ', handle.read())]


def logged_when(nginx, wanted, what):
    """nginx's logged requests once one of them is ``wanted`` (nginx logs a
    request when it is done with it)."""
    def logged():
        found = logged_requests(nginx)
        return found if any(map(wanted, found)) else None
    return wait_until(logged, f"nginx to log {what}", timeout=10)


def outcome(driver, timeout=60):
    """Wait for the page to finish; its outcome and what it recorded."""
    try:
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script("return document.body.dataset.outcome"))
    except Exception as error:  # noqa: BLE001 - say what the page got to
        raise AssertionError(f"the page did not finish in {timeout} s: {error!r}\n"
                             + page_report(driver)) from None
    return (driver.execute_script("return document.body.dataset.outcome"),
            json.loads(driver.find_element("id", "result").text))


def page_report(driver):
    """What the page recorded and the browser's console, for failure messages."""
    try:
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
    except Exception as error:  # noqa: BLE001 - the log is a diagnostic only
        console = f"(no console log: {error!r})"
    return (f"page: {driver.find_element('id', 'result').text}\nconsole:\n{console}")


def test_a_page_from_a_listed_origin_uploads_with_a_grant_and_shows_the_thumbnail(browser, app):
    pipeline, backend, _ = app
    # When the app's page, on an origin cors_origins lists, runs in the browser
    browser.get(backend.page_url())
    state, page = outcome(browser)
    report = page_report(browser)
    # Then its backend got a grant with the app's key
    assert [g.status_code for g in backend.grants] == [201], [g.text for g in backend.grants]
    assert page["grant"]["grant"] == backend.grants[0].json()["grant"]
    # And the browser's upload was accepted, its Location readable by the page
    assert state == "shown", report
    job_id = page["upload"]["id"]
    assert page["upload_status"] == 202, report
    assert page["location"] == f"/jobs/{job_id}", report
    # And the thumbnail the page shows is the one the job reports, read from the DOM
    thumb = page["job"]["renditions"]["thumb"]
    natural_width = browser.execute_script(
        "const img = document.getElementById('thumb');"
        "return img.complete ? img.naturalWidth : -1;")
    assert natural_width == thumb["width"] > 0, report
    assert browser.find_element("id", "thumb").get_attribute("src") == \
        pipeline.nginx.base_url + thumb["url"]
    # And all of it went through nginx: the preflight, the 202, the job, the thumbnail
    seen = logged_when(pipeline.nginx, lambda request: request == ("GET", thumb["url"], 200),
                       "the thumbnail's GET")
    assert ("POST", "/grants", 201) in seen, seen
    assert ("OPTIONS", "/upload", 204) in seen, seen
    assert ("POST", "/upload", 202) in seen, seen
    assert seen.index(("OPTIONS", "/upload", 204)) < seen.index(("POST", "/upload", 202)), seen
    assert ("GET", f"/jobs/{job_id}", 200) in seen, seen
    # And the job is the grant's owner's, which the public job answer does not show
    assert f"{job_id}.json" in pipeline.stored_jobs()
    with open(os.path.join(pipeline.root, "jobs", f"{job_id}.json")) as handle:
        assert json.load(handle)["owner"] == OWNER
    assert "owner" not in page["job"]


@pytest.mark.parametrize("host", ["other-port", "localhost"])
def test_the_same_page_from_an_unlisted_origin_is_blocked_by_the_browser(browser, app, host):
    pipeline, listed, unlisted = app
    # When the same page is loaded from an origin cors_origins does not list:
    # the same backend's port by another name, or the backend on another port
    if host == "localhost":
        browser.get(listed.page_url("localhost"))
        backend = listed
    else:
        browser.get(unlisted.page_url())
        backend = unlisted
    state, page = outcome(browser)
    report = page_report(browser)
    # Then it got its grant from its backend (its own origin)
    assert [g.status_code for g in backend.grants] == [201], [g.text for g in backend.grants]
    # But the browser refused to send the upload: fetch() rejected with a TypeError
    assert state == "error", report
    assert page["steps"] == ["grant", "error"], report
    assert page["error"]["name"] == "TypeError", report
    # The preflight may reach nginx; the POST never does
    seen = logged_when(pipeline.nginx, lambda request: request[:2] == ("OPTIONS", "/upload"),
                       "the preflight")
    assert not [request for request in seen if request[:2] == ("POST", "/upload")], seen
    # And nothing is stored or queued
    assert pipeline.stored_jobs() == [] and pipeline.stored_originals() == []
    assert pipeline.queue_depth() == 0
    # And the grant was good and is unspent: only the browser stopped the upload
    grant = page["grant"]["grant"]
    answer = requests.post(pipeline.nginx.base_url + "/upload", timeout=30,
                           headers={"Authorization": f"Bearer {grant}"},
                           files={"file": ("photo.jpg", PHOTO, "image/jpeg")})
    assert answer.status_code == 202, answer.text
