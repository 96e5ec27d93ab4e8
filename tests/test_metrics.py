"""GET /metrics (Prometheus text format), and the counters behind it."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastaphlict.config import PeerConfig
from fastaphlict.metrics import MAX_INSTANCES
from fastaphlict.server import Limits
from support import TIMEOUT, local_config, running, stalled_websocket


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def scrape(srv) -> dict[tuple[str, tuple], float]:
    async with srv.session.get(f"{srv.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_follow_activity() -> None:
    async with running() as srv:
        async with srv.client("/~acme/") as browser:
            await browser.subscribe("PHID-1")
            await srv.post({"subscribers": ["PHID-1"], "n": 1}, instance="acme")
            frame = await browser.recv_raw()
            await browser.send("replay", {"age": 60000})
            await browser.recv_raw()
            await browser.send_raw("garbage")
            await browser.send_raw('{"command":"subscribe","data":null}')  # routine, not rejected
            await browser.sync()
            await srv.post(None, raw=b"[]")
            m = await scrape(srv)
        acme = (("instance", "acme"),)
        assert m[("fastaphlict_connections_open", acme)] == 1
        assert m[("fastaphlict_connections_total", acme)] == 1
        assert m[("fastaphlict_history_size", acme)] == 1
        assert m[("fastaphlict_messages_in_total", ())] == 1
        assert m[("fastaphlict_deliveries_total", ())] == 1
        assert m[("fastaphlict_replays_total", ())] == 1
        assert m[("fastaphlict_replayed_messages_total", ())] == 1
        assert m[("fastaphlict_rejected_frames_total", ())] == 1
        assert m[("fastaphlict_rejected_posts_total", ())] == 1
        # The delivery, the replay and the pongs all count as bytes sent.
        assert m[("fastaphlict_sent_bytes_total", ())] >= 2 * len(frame.encode())


async def test_instance_labels_are_bounded() -> None:
    async with running() as srv:
        for n in range(MAX_INSTANCES + 15):
            await srv.post({"subscribers": []}, instance=f"flood{n}")
        m = await scrape(srv)
        labelled = {k for k in m if k[0] == "fastaphlict_history_size"}
        assert len(labelled) == MAX_INSTANCES + 1
        assert m[("fastaphlict_history_size", (("instance", "_other"),))] == 15


async def test_relay_metrics_per_peer() -> None:
    async with running() as b:
        peer = PeerConfig("127.0.0.1", b.server.admin_ports[0], "http")
        async with running(local_config(peers=(peer,))) as a:
            await a.post({"subscribers": []})
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if a.server.relay.peers[0].sent:
                    break
                await asyncio.sleep(0.01)
            m = await scrape(a)
            label = (("peer", a.server.relay.peers[0].url),)
            assert m[("fastaphlict_relay_sent_total", label)] == 1
            assert m[("fastaphlict_relay_failed_total", label)] == 0
            assert m[("fastaphlict_peer_fingerprint_known", label)] == 1
            assert m[("fastaphlict_relay_seconds_count", label)] == 1
            assert m[("fastaphlict_relay_seconds_bucket", (("le", "+Inf"), *label))] == 1


# -- slow consumers ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_slow_client_is_closed_and_others_keep_receiving() -> None:
    limits = Limits(max_buffered=256 * 1024)
    async with running(limits=limits) as srv:
        stalled = await stalled_websocket(srv.server.client_ports[0])
        try:
            async with srv.client() as healthy:
                await healthy.subscribe("PHID-1")
                pad = "x" * 60_000
                for n in range(300):  # ~18 MB to a socket that reads nothing
                    assert (
                        await srv.post({"subscribers": ["PHID-1"], "n": n, "pad": pad})
                    ).status == 200
                    assert (await healthy.recv())["n"] == n, "the healthy tab keeps up"
                    if srv.hub.stats.slow_disconnects:
                        break
                assert srv.hub.stats.slow_disconnects == 1
                await srv.post({"subscribers": ["PHID-1"], "n": "after"})
                while (await healthy.recv())["n"] != "after":
                    pass
                m = await scrape(srv)
                assert m[("fastaphlict_slow_client_disconnects_total", ())] == 1
                assert m[("fastaphlict_connections_open", (("instance", "default"),))] == 1
        finally:
            stalled.close()


#: Hub integers that are not process counters: a setting, and a gauge exported
#: per instance as fastaphlict_connections_open.
async def test_every_hub_counter_is_exported() -> None:
    """A counter the hub keeps but /metrics doesn't show is invisible in production."""
    async with running() as srv:
        counters = [f.name for f in dataclasses.fields(srv.hub.stats)]
        assert "dead_disconnects" in counters and "slow_disconnects" in counters
        for n, name in enumerate(counters):
            setattr(srv.hub.stats, name, 1_000_003 + 7 * n)  # a value nothing else can show
        m = await scrape(srv)
        values = set(m.values())
        missing = [n for n in counters if getattr(srv.hub.stats, n) not in values]
        assert not missing, f"hub counters not exported: {missing}"


async def test_dead_client_disconnects_are_exported() -> None:
    async with running() as srv:
        srv.hub.stats.dead_disconnects = 3
        m = await scrape(srv)
        assert m[("fastaphlict_dead_client_disconnects_total", ())] == 3


async def test_a_scrape_never_shows_expired_history(monkeypatch) -> None:
    import fastaphlict.hub as hub_module
    from fastaphlict.hub import HISTORY_TTL_MS

    async with running() as srv:
        now = hub_module.now_ms()
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - HISTORY_TTL_MS - 1)
        assert (await srv.post({"subscribers": ["PHID-A"]}, instance="gone")).status == 200
        monkeypatch.undo()
        async with srv.session.get(f"{srv.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'instance="gone"' not in text
        assert "fastaphlict_instances 0.0" in text
