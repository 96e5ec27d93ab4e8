"""The status page in a real headless Chromium, against real server processes on a real Redis.

Two nodes share a Redis; ten tabs (WebSockets) sit on three instances of the
first; a thread posts to it at a rate that rises and falls, and a tab asks
for replays now and then. The page must load, show the numbers move, draw
its chart, look like something in a screenshot, say "disconnected" when the
server goes away and come back on its own when it returns.

The screenshot goes to the test's temporary directory; with
``FASTAPHLICT_DASHBOARD_SCREENSHOT=PATH`` (and ``FASTAPHLICT_DASHBOARD_SECONDS``
for a longer chart) it is written there too: that is how the README's
``docs/dashboard.png`` is made, by this test's own browser.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from browser_support import WAIT_MS, chromium, colours, png_pixels
from fastaphlict import __version__
from redis_support import RedisServer
from support import PHORGE_CONTENT_TYPE, TIMEOUT, ServerProcess, scaled, spawn, stop

SCREENSHOT = "FASTAPHLICT_DASHBOARD_SCREENSHOT"
SECONDS = "FASTAPHLICT_DASHBOARD_SECONDS"
#: Tabs per instance on the first node.
TABS = {"acme": 6, "beta": 3, "gamma": 1}
TEXT = "a message nobody else may read"
VIEWPORT = {"width": 1200, "height": 700}


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def post(server: ServerProcess, instance: str, subscribers: list[str], key: int) -> None:
    body = {"key": str(key), "type": "notification", "subscribers": subscribers, "text": TEXT}
    request = urllib.request.Request(
        f"{server.admin_url}/?instance={instance}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": PHORGE_CONTENT_TYPE},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 200


def open_tabs(
    server: ServerProcess, stack: contextlib.ExitStack
) -> list[tuple[str, str, ClientConnection]]:
    """``(instance, user PHID, socket)`` per tab, each subscribed (its pong came back)."""
    tabs = []
    for instance, count in TABS.items():
        for n in range(count):
            user = f"PHID-USER-{instance}{n}"
            ws = stack.enter_context(
                # Unbounded: its thread reads on (and answers pings) while nobody recv()s.
                connect(f"{server.client_url}/~{instance}/", open_timeout=TIMEOUT, max_queue=None)
            )
            ws.send(json.dumps({"command": "subscribe", "data": [user, f"PHID-TASK-{instance}"]}))
            ws.send(json.dumps({"command": "ping", "data": None}))
            assert ws.recv(TIMEOUT) == '{"type":"pong"}'
            tabs.append((instance, user, ws))
    return tabs


def traffic(
    server: ServerProcess, tabs: list, seconds: float, done: threading.Event, failed: list
) -> None:
    try:
        _traffic(server, tabs, seconds, done)
    except Exception as exc:
        failed.append(exc)


def _traffic(server: ServerProcess, tabs: list, seconds: float, done: threading.Event) -> None:
    """Posts for ``seconds`` at 4 to 40 a second (a slow wave), a replay every 2 s.

    Each goes to one tab, and every third to all the tabs of its instance.
    """
    key = 0
    started = time.monotonic()
    replayed = started
    while (elapsed := time.monotonic() - started) < seconds and not done.is_set():
        rate = 22 + 18 * math.sin(elapsed / 4)
        instance, user, ws = tabs[key % len(tabs)]
        # Every third one goes to every tab of its instance.
        post(server, instance, [user, f"PHID-TASK-{instance}" if key % 3 == 0 else "PHID-X"], key)
        key += 1
        if time.monotonic() - replayed > 2:
            replayed = time.monotonic()
            ws.send(json.dumps({"command": "replay", "data": {"age": 1000}}))
        time.sleep(1 / rate)


def canvas_pixels(page: Any, canvas: str, colour: str) -> int:
    """Pixels of ``canvas`` within a small distance of the CSS colour ``colour`` (#rrggbb)."""
    return page.evaluate(
        """([id, hex]) => {
            const c = document.getElementById(id);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const want = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
            let n = 0;
            for (let i = 0; i < d.length; i += 4)
                if (d[i + 3] > 200 && want.every((v, k) => Math.abs(d[i + k] - v) < 40)) n++;
            return n;
        }""",
        [canvas, colour],
    )


def number(page: Any, selector: str) -> float:
    text = page.inner_text(selector).replace(",", "").split()[0]
    return float(text) if text != "-" else math.nan


@pytest.mark.timeout(240)
def test_the_page_shows_the_server_live_and_says_when_it_is_gone(
    browser: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    seconds = float(os.environ.get(SECONDS) or 10)
    broker = f"--broker={redis_server.url}"
    node = spawn(tmp_path / "a.log", broker)
    other = spawn(tmp_path / "b.log", broker)
    done = threading.Event()
    poster: threading.Thread | None = None
    tabs: list = []
    stack = contextlib.ExitStack()
    failed: list[Exception] = []
    try:
        node.wait_ready()
        other.wait_ready()
        tabs = open_tabs(node, stack)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(f"{node.admin_url}/dashboard")

        # It loads and reads: the server's version, the tabs, both nodes on the broker.
        page.wait_for_function("() => window.dashboard.readings >= 2")
        page.wait_for_function("() => window.dashboard.last.broker.nodes === 2")
        assert page.inner_text("#state") == "live"
        assert page.inner_text("#version") == __version__
        assert number(page, "#tabs") == sum(TABS.values())
        assert page.locator("#instances tr").first.inner_text().split()[:2] == ["acme", "6"]
        assert "up" in page.inner_text("#broker")
        before = number(page, "#messages-in")
        assert before == 0

        poster = threading.Thread(
            target=traffic, args=(node, tabs, seconds, done, failed), daemon=True
        )
        poster.start()
        # The numbers move: the counter, and the rates the page computes.
        page.wait_for_function(
            "() => Number(document.getElementById('messages-in').textContent.replace(/,/g, '')) > 0"
            " && parseFloat(document.getElementById('in-rate').textContent) > 0"
            " && parseFloat(document.getElementById('out-rate').textContent) > 0"
        )
        # The chart draws: after a few samples, both lines are on their canvas.
        page.wait_for_function("() => window.dashboard.samples.length >= 6")
        assert canvas_pixels(page, "chart-in", "#2563eb") > 50
        assert canvas_pixels(page, "chart-out", "#16a34a") > 50
        poster.join(seconds + scaled(30))
        assert not poster.is_alive() and failed == []
        assert number(page, "#tabs") == sum(TABS.values()), "every tab stayed"
        assert page.evaluate("window.dashboard.last.counters.replays") > 0

        # A screenshot that is not blank: many colours, none covering nearly all of it.
        shot = page.screenshot()
        width, height, _ = png_pixels(shot)
        assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
        counts = colours(shot)
        assert len(counts) > 50, len(counts)
        assert counts.most_common(1)[0][1] < 0.8 * width * height
        (tmp_path / "dashboard.png").write_bytes(shot)
        if os.environ.get(SCREENSHOT):
            Path(os.environ[SCREENSHOT]).write_bytes(shot)

        # Only counts and operator names: no PHID, no message text.
        shown = page.content()
        assert "PHID" not in shown and TEXT not in shown
        assert errors == []

        # A tab in the background stops reading, and reads again when shown.
        hide = """hidden => {
            Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
            document.dispatchEvent(new Event("visibilitychange"));
        }"""
        page.evaluate(hide, True)
        hidden_at = page.evaluate("window.dashboard.readings")
        page.wait_for_timeout(3000)  # three intervals: at most the one under way lands
        assert page.evaluate("window.dashboard.readings") <= hidden_at + 1
        page.evaluate(hide, False)
        page.wait_for_function(f"() => window.dashboard.readings > {hidden_at + 1}")

        # The server goes away: the page says so instead of freezing, and keeps trying.
        node.stop()
        page.wait_for_function("() => window.dashboard.state === 'disconnected'")
        assert page.inner_text("#state").startswith("disconnected")
        node = node.restart()
        node.wait_ready()
        page.wait_for_function(
            "() => window.dashboard.state === 'live'"
            " && window.dashboard.last.counters.messages_in === 0"
        )
        assert number(page, "#tabs") == 0
    finally:
        done.set()
        if poster is not None:
            poster.join(scaled(10))
        stack.close()
        stop(node, other)


def test_the_readme_screenshot_is_a_real_screenshot_of_the_page() -> None:
    """``docs/dashboard.png`` is page-sized, with a page's variety, as the test above makes it."""
    data = (Path(__file__).resolve().parents[1] / "docs" / "dashboard.png").read_bytes()
    width, height, _ = png_pixels(data)
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    counts = colours(data)
    assert len(counts) > 50 and counts.most_common(1)[0][1] < 0.8 * width * height
