"""End to end with a real browser: headless Chromium, a Phorge-like page, a real server process.

The page (``browser_page.html``) holds a WebSocket the way ``JX.Aphlict`` does:
subscribe on open, replay on reconnect, ping every few seconds, reconnect when
the socket closes. The test posts to the admin port as Phorge's PHP does and
reads what the page received, then restarts the server and checks that the
page comes back on its own.

Chromium is Debian's, under Playwright (``browser_support.py`` says how it is
started, and when a missing one skips or fails).
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from browser_support import WAIT_MS, chromium
from support import PHORGE_CONTENT_TYPE, TIMEOUT, ServerProcess, scaled, spawn

PAGE = Path(__file__).with_name("browser_page.html")

USER = "PHID-USER-alice"
TASK = "PHID-TASK-acme1"
TEXT = "build 100% done & a=1 — ünïcødé"


def post(server: ServerProcess, message: dict[str, Any], instance: str = "acme") -> None:
    """Post to ``server`` as Phorge's PHP does: raw JSON under the form content type."""
    request = urllib.request.Request(
        f"{server.admin_url}/?instance={instance}",
        data=json.dumps(message, ensure_ascii=False).encode(),
        headers={"Content-Type": PHORGE_CONTENT_TYPE},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 200
        assert "fingerprint" in json.loads(response.read())


def status(server: ServerProcess, instance: str = "acme") -> dict[str, Any]:
    url = f"{server.admin_url}/status/?instance={instance}"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return json.loads(response.read())


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium (``browser_support.chromium``)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server started from a config file."""
    with spawn(tmp_path / "server.log", config={}) as server:
        server.wait_ready()
        yield server


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/":
            self.send_error(404)
            return
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The page's own little web server: another origin than the WebSocket's, as in Phorge."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def notification(key: int, *subscribers: str) -> dict[str, Any]:
    """A feed notification shaped like Phorge's, plus a text field to check byte for byte."""
    return {
        "key": str(key),
        "type": "notification",
        "subscribers": list(subscribers),
        "text": TEXT,
    }


@pytest.mark.timeout(120)
def test_browser_receives_notifications_and_reconnects_after_restart(
    browser: Any, server: ServerProcess, page_origin: str
) -> None:
    ws = f"ws://127.0.0.1:{server.client_port}/~acme/?instance=acme"
    url = f"{page_origin}/?{urlencode([('ws', ws), ('phid', USER), ('phid', TASK)])}"
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)

    def received() -> list[dict[str, Any]]:
        return page.evaluate("window.aphlict.received")

    def wait_for_key(key: str) -> None:
        page.wait_for_function(
            "key => window.aphlict.received.some(m => m.key === key)", arg=key, timeout=WAIT_MS
        )

    # Subscribed: the pong after the subscribe command came back.
    page.wait_for_function("window.aphlict.ready === 1", timeout=WAIT_MS)

    post(server, notification(100, "PHID-USER-bob", TASK))
    wait_for_key("100")
    [first] = received()
    assert first["type"] == "notification"
    assert first["text"] == TEXT
    assert first["subscribers"] == ["PHID-USER-bob", TASK]
    assert isinstance(first["touched"], list)
    # The page shows it, too: the frame's text as it arrived.
    assert TEXT in page.inner_text("#received li")

    # Restart: SIGTERM sends close 1001; the page reconnects, subscribes again
    # and confirms it with a pong on the new connection. Its old socket closed
    # only once the old listener had, so the new one is on the new process.
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(scaled(15)) == 0, server.log()
    server = server.restart()  # on the same ports, appending to the same log
    try:
        server.wait_ready()
        page.wait_for_function("window.aphlict.ready >= 2", timeout=WAIT_MS)
        assert page.evaluate("window.aphlict.closeCodes[0]") == 1001
        assert status(server)["clients.active"] == 1

        # Not for this page: another user's PHID, and this page's PHID on another
        # instance. Posted first, so they would arrive first.
        post(server, notification(201, "PHID-USER-stranger"))
        post(server, notification(202, USER), instance="other")
        post(server, notification(203, USER))
        wait_for_key("203")
        keys = [m["key"] for m in received()]
        assert keys == ["100", "203"], "only what is addressed to this page, once each"
        assert received()[1]["text"] == TEXT
        assert page.locator("#received li").count() == 2
        assert errors == []
        assert "Traceback" not in server.log()
    finally:
        server.stop()
