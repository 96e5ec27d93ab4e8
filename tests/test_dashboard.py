"""GET /dashboard.json and /dashboard on the admin port: what they show, what they never do.

The page itself, in Chromium, is ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

from fastaphlict.config import PeerConfig
from fastaphlict.dashboard import TOP_INSTANCES
from fastaphlict.server import Limits
from redis_support import RedisServer
from support import TIMEOUT, eventually, local_config, run, settings

USER, TASK = "PHID-USER-dashsecret1", "PHID-TASK-dashsecret2"
TEXT = "the secret text of a message, ünïcødé"


async def reading(srv: Any) -> tuple[dict[str, Any], str]:
    """One reading of ``/dashboard.json``: parsed, and the raw body."""
    async with srv.session.get(f"{srv.admin_url}/dashboard.json") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Cache-Control"] == "no-store"
        text = await resp.text()
    return json.loads(text), text


async def raw_get(port: int, path: str) -> bytes:
    """A plain ``GET path`` on the admin port; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


async def test_fields_types_and_counters_that_move() -> None:
    async with run(settings()) as srv, srv.client("/~acme/") as tab:
        first, _ = await reading(srv)
        assert first["version"] == __import__("fastaphlict").__version__
        assert isinstance(first["uptime"], float) and first["uptime"] >= 0
        assert first["tabs"] == 1
        assert set(first["counters"]) == {
            "messages_in",
            "deliveries",
            "replays",
            "replayed",
            "slow_disconnects",
            "dead_disconnects",
            "rejected_frames",
            "rejected_posts",
        }
        assert all(isinstance(v, int) for v in first["counters"].values())
        assert first["peers"] == [] and first["broker"] is None
        process = first["process"]
        assert isinstance(process["rss_bytes"], int) and process["rss_bytes"] > 10_000_000
        assert isinstance(process["cpu_seconds"], float) and process["cpu_seconds"] > 0
        assert first["instances"] == {
            "count": 1,
            "top": [{"name": "acme", "tabs": 1, "history_size": 0, "history_age": None}],
            "other_tabs": 0,
            "other_history": 0,
        }

        await tab.subscribe(USER)
        message = {"key": "1", "type": "notification", "subscribers": [USER, TASK], "text": TEXT}
        for _ in range(3):
            assert (await srv.post(message, instance="acme")).status == 200
            assert (await tab.recv())["text"] == TEXT
        assert (await srv.post(None, raw=b"not json", instance="acme")).status == 400
        await tab.send_raw("not a command")
        await tab.send("replay", {"age": 60000})
        for _ in range(3):
            assert (await tab.recv())["text"] == TEXT
        await tab.sync()
        after, body = await reading(srv)

    counters = {k: after["counters"][k] - v for k, v in first["counters"].items()}
    assert counters == {
        "messages_in": 3,
        "deliveries": 3,
        "replays": 1,
        "replayed": 3,
        "slow_disconnects": 0,
        "dead_disconnects": 0,
        "rejected_frames": 1,
        "rejected_posts": 1,
    }
    assert after["uptime"] > first["uptime"]
    [acme] = after["instances"]["top"]
    assert acme["name"] == "acme" and acme["history_size"] == 3
    assert isinstance(acme["history_age"], int) and 0 <= acme["history_age"] < TIMEOUT * 1000
    # Neither PHIDs nor what a message says: only counts.
    for secret in (USER, TASK, "PHID-", "secret", "ünïcødé"):
        assert secret not in body, secret


async def test_the_busiest_instances_by_name_and_the_rest_summed() -> None:
    async with run(settings()) as srv:
        for n in range(TOP_INSTANCES + 5):
            for _ in range(n + 1):
                assert (await srv.post({"subscribers": []}, instance=f"i{n:02}")).status == 200
        async with srv.client("/~i00/") as tab:
            await tab.sync()
            r, _ = await reading(srv)
    inst = r["instances"]
    assert inst["count"] == TOP_INSTANCES + 5
    names = [i["name"] for i in inst["top"]]
    # Tabs first (i00 has the one tab), then the longest histories.
    assert names == ["i00", *(f"i{n:02}" for n in range(TOP_INSTANCES + 4, 5, -1))]
    assert inst["other_tabs"] == 0
    assert inst["other_history"] == sum(range(2, 7))  # i01..i05 hold 2..6


async def test_broker_and_peers_with_their_health(tmp_path: Path) -> None:
    async with run(settings()) as peer_node:
        good = PeerConfig("127.0.0.1", peer_node.server.admin_ports[0], "http")
        bad = PeerConfig("127.0.0.1", _closed_port(), "http")
        config = local_config(peers=(good, bad))
        with RedisServer(tmp_path / "redis") as redis:
            limits = Limits(broker_probe_interval=0.05)
            async with run(
                settings([f"--broker={redis.url}"], config=config, limits=limits)
            ) as srv:
                await srv.broker_up()
                assert (await srv.post({"subscribers": []})).status == 200
                relay = srv.server.relay
                await eventually(lambda: relay.peers[0].sent == 1 and relay.peers[1].failing)
                r, _ = await reading(srv)
                display = srv.server.broker.display
    ok, failing = r["peers"]
    assert ok["url"] == f"http://127.0.0.1:{good.port}/"
    assert ok["healthy"] is True and ok["fingerprint_known"] is True
    assert (ok["sent"], ok["failed"], ok["dropped"]) == (1, 0, 0)
    assert isinstance(ok["latency_ms"], float) and ok["last_error"] is None
    assert failing["healthy"] is False and failing["failed"] == 1 and failing["sent"] == 0
    assert isinstance(failing["last_error"], str) and failing["latency_ms"] is None
    broker = r["broker"]
    assert broker["up"] is True and broker["nodes"] == 1 and broker["buffered"] == 0
    assert broker["display"] == display and str(redis.port) in display
    catch_up = broker["last_catch_up"]
    assert catch_up["messages"] == 0
    assert 0 <= catch_up["seconds"] < TIMEOUT and 0 <= catch_up["ago"] < TIMEOUT


async def test_the_broker_its_cluster_the_last_catch_up_and_down(tmp_path: Path) -> None:
    """Nodes seen, what the catch-up at start brought, and a Redis gone: down, posts buffered."""
    limits = Limits(broker_probe_interval=0.05)
    with RedisServer(tmp_path / "redis") as redis:
        broker = settings([f"--broker={redis.url}"], limits=limits)
        async with run(broker) as early:
            await early.broker_up()
            for key in range(3):  # distinct: equal payloads are one message to a merge
                message = {"key": str(key), "subscribers": []}
                assert (await early.post(message, instance="acme")).status == 200
            await eventually(lambda: early.server.broker.stats.published == 3)
            async with run(settings([f"--broker={redis.url}"], limits=limits)) as srv:
                await srv.broker_up()
                await eventually(lambda: len(srv.server.broker.members()) == 1)
                up, _ = await reading(srv)
                redis.stop()
                await eventually(lambda: not srv.server.broker.up)
                assert (await srv.post({"subscribers": []})).status == 200
                down, _ = await reading(srv)
    assert up["broker"]["up"] is True and up["broker"]["nodes"] == 2
    assert up["broker"]["last_catch_up"]["messages"] == 3
    assert up["broker"]["buffered"] == 0 and up["broker"]["received"] == 0
    assert down["broker"]["up"] is False and down["broker"]["buffered"] == 1
    assert down["broker"]["last_catch_up"] == {
        **up["broker"]["last_catch_up"],
        "ago": down["broker"]["last_catch_up"]["ago"],
    }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_reading_never_writes(monkeypatch) -> None:
    """The JSON counts what expiry would leave and leaves the hub as it was (as /metrics)."""
    import fastaphlict.hub as hub_module
    import fastaphlict.server as server_module
    from fastaphlict.hub import HISTORY_TTL_MS

    monkeypatch.setattr(server_module, "EXPIRE_INTERVAL", 3600.0)
    async with run(settings()) as srv:
        now = hub_module.now_ms()
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - HISTORY_TTL_MS - 1)
        for name in ("gone", "mixed"):
            assert (await srv.post({"subscribers": ["PHID-A"]}, instance=name)).status == 200
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - 2000)
        assert (await srv.post({"subscribers": ["PHID-B"]}, instance="mixed")).status == 200
        monkeypatch.setattr(hub_module, "now_ms", lambda: now)
        before = _hub_state(srv.hub)

        r, _ = await reading(srv)
        again, _ = await reading(srv)

        assert _hub_state(srv.hub) == before, "a reading changed the hub"
        assert r["instances"] == again["instances"]
        assert r["instances"]["top"] == [
            {"name": "mixed", "tabs": 0, "history_size": 1, "history_age": 2000}
        ]
        assert r["counters"] == again["counters"]


def _hub_state(hub: Any) -> tuple[dict, dict]:
    held = {
        inst.name: (inst.channel.size, inst.clients_total, inst.history.entries())
        for inst in hub.instances()
    }
    return held, dataclasses.asdict(hub.stats)


async def test_outside_the_allow_list_both_routes_are_403() -> None:
    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8",)))) as srv:
        port = srv.server.admin_ports[0]
        for path in ("/dashboard", "/dashboard.json"):
            answer = await raw_get(port, path)
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert b"fastaphlict" not in answer and b"uptime" not in answer
    async with run(settings(limits=Limits(admin_allow=("127.0.0.0/8",)))) as srv:
        assert (await raw_get(srv.server.admin_ports[0], "/dashboard")).startswith(b"HTTP/1.1 200 ")


async def test_the_page_and_what_status_and_root_still_answer() -> None:
    """The page is self-contained; ``/status/`` and ``/`` answer as they did before it was read.

    (``test_admin`` holds ``/status/``'s keys, types and order, with these routes present.)
    """
    async with run(settings()) as srv:
        assert (await srv.post({"subscribers": ["PHID-A"]})).status == 200
        status_before = await srv.status()
        async with srv.session.get(f"{srv.admin_url}/") as resp:
            root_before = (resp.status, resp.headers["Content-Type"], await resp.text())

        async with srv.session.get(f"{srv.admin_url}/dashboard") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            page = await resp.text()
        assert page.startswith("<!DOCTYPE html>") and "dashboard.json" in page
        # Nothing from elsewhere: no CDN, no external script, style or font.
        for outside in ("http://", "https://", "//cdn", "<script src", "<link"):
            assert outside not in page, outside
        for _ in range(3):
            await reading(srv)

        status = await srv.status()
        assert list(status) == list(status_before)
        assert status.pop("uptime") >= status_before.pop("uptime")
        assert status.pop("history.age") >= status_before.pop("history.age")
        assert status == status_before
        async with srv.session.get(f"{srv.admin_url}/") as resp:
            assert (resp.status, resp.headers["Content-Type"], await resp.text()) == root_before
        assert root_before == (405, "text/plain; charset=utf-8", "method not allowed\n")
        for path in ("/status", "/dashboard/", "/dashboard.html", "/dashboard.json/"):
            async with srv.session.get(f"{srv.admin_url}{path}") as resp:
                assert resp.status == 404, path
        async with srv.session.post(f"{srv.admin_url}/dashboard", data=b"{}") as resp:
            assert resp.status == 405
        assert (await srv.status())["messages.in"] == 1, "nothing but POST / counts as a post"
