"""GET /metrics (Prometheus text format), and the counters behind it."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastaphlict import metrics
from fastaphlict.broker import LATENCY_BUCKETS, Broker
from fastaphlict.config import PeerConfig, parse_broker_url
from fastaphlict.hub import Hub
from fastaphlict.metrics import MAX_INSTANCES
from fastaphlict.server import Limits
from redis_support import RedisServer
from support import TIMEOUT, eventually, local_config, run, settings, stalled_websocket


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
    async with run(settings()) as srv:
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
    async with run(settings()) as srv:
        for n in range(MAX_INSTANCES + 15):
            await srv.post({"subscribers": []}, instance=f"flood{n}")
        m = await scrape(srv)
        labelled = {k for k in m if k[0] == "fastaphlict_history_size"}
        assert len(labelled) == MAX_INSTANCES + 1
        assert m[("fastaphlict_history_size", (("instance", "_other"),))] == 15


async def test_relay_metrics_per_peer() -> None:
    async with run(settings()) as b:
        peer = PeerConfig("127.0.0.1", b.server.admin_ports[0], "http")
        async with run(settings(config=local_config(peers=(peer,)))) as a:
            await a.post({"subscribers": []})
            await eventually(lambda: a.server.relay.peers[0].sent, TIMEOUT, "the relay was sent")
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
    async with run(settings(limits=limits)) as srv:
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
    async with run(settings()) as srv:
        counters = [f.name for f in dataclasses.fields(srv.hub.stats)]
        assert "dead_disconnects" in counters and "slow_disconnects" in counters
        for n, name in enumerate(counters):
            setattr(srv.hub.stats, name, 1_000_003 + 7 * n)  # a value nothing else can show
        m = await scrape(srv)
        values = set(m.values())
        missing = [n for n in counters if getattr(srv.hub.stats, n) not in values]
        assert not missing, f"hub counters not exported: {missing}"


async def test_dead_client_disconnects_are_exported() -> None:
    async with run(settings()) as srv:
        srv.hub.stats.dead_disconnects = 3
        m = await scrape(srv)
        assert m[("fastaphlict_dead_client_disconnects_total", ())] == 3


async def test_a_scrape_never_shows_expired_history(monkeypatch) -> None:
    import fastaphlict.hub as hub_module
    from fastaphlict.hub import HISTORY_TTL_MS

    async with run(settings()) as srv:
        now = hub_module.now_ms()
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - HISTORY_TTL_MS - 1)
        assert (await srv.post({"subscribers": ["PHID-A"]}, instance="gone")).status == 200
        monkeypatch.undo()
        async with srv.session.get(f"{srv.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'instance="gone"' not in text
        assert "fastaphlict_instances 0.0" in text


def _hub_state(hub: Hub) -> tuple[dict, dict]:
    """Everything a read could change: each instance's sockets, totals and entries; the counters."""
    held = {
        inst.name: (inst.channel.size, inst.clients_total, inst.history.entries())
        for inst in hub.instances()
    }
    return held, dataclasses.asdict(hub.stats)


async def test_a_read_never_writes(monkeypatch) -> None:
    """/metrics and /status/ report what expiry would leave, and leave the hub as it was.

    Expiry is the server's periodic work (held off here): a read counts only
    live entries and omits instances left with nothing, but drops neither.
    """
    import fastaphlict.hub as hub_module
    import fastaphlict.server as server_module
    from fastaphlict.hub import HISTORY_TTL_MS

    monkeypatch.setattr(server_module, "EXPIRE_INTERVAL", 3600.0)
    async with run(settings()) as srv:
        now = hub_module.now_ms()
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - HISTORY_TTL_MS - 1)
        for name in ("gone", "default", "mixed"):
            assert (await srv.post({"subscribers": ["PHID-A"]}, instance=name)).status == 200
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - 2000)
        assert (await srv.post({"subscribers": ["PHID-B"]}, instance="mixed")).status == 200
        monkeypatch.setattr(hub_module, "now_ms", lambda: now)
        before = _hub_state(srv.hub)
        assert {name: len(held[2]) for name, held in before[0].items()} == {
            "gone": 1,
            "default": 1,
            "mixed": 2,
        }

        m = await scrape(srv)
        gone, default, mixed = [await srv.status(name) for name in ("gone", "default", "mixed")]
        m_again = await scrape(srv)

        assert _hub_state(srv.hub) == before, "a read changed the hub"
        assert m_again == m
        assert ("fastaphlict_history_size", (("instance", "gone"),)) not in m
        assert m[("fastaphlict_history_size", (("instance", "default"),))] == 0
        assert m[("fastaphlict_history_size", (("instance", "mixed"),))] == 1
        assert m[("fastaphlict_instances", ())] == 2  # default stays, as expiry keeps it
        for status in (gone, default):
            assert status["history.size"] == 0 and status["history.age"] is None
        assert mixed["history.size"] == 1 and mixed["history.age"] == 2000

        # The periodic work is what drops them.
        for _ in srv.hub.housekeeping():
            pass
        after = {name: len(held[2]) for name, held in _hub_state(srv.hub)[0].items()}
        assert after == {"default": 0, "mixed": 1}
        assert await scrape(srv) == m


# -- the broker -----------------------------------------------------------------------

PASSWORD = "hunter22-Secret"
BROKER_SERIES = (
    "fastaphlict_broker_up",
    "fastaphlict_broker_buffered",
    "fastaphlict_broker_published_total",
    "fastaphlict_broker_dropped_total",
    "fastaphlict_broker_publish_failures_total",
    "fastaphlict_broker_reconnects_total",
    "fastaphlict_broker_received_total",
    "fastaphlict_broker_publish_seconds_count",
    "fastaphlict_broker_publish_seconds_sum",
)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_broker_counters_are_exported_without_the_password() -> None:
    hub = Hub("ME")
    broker = Broker(hub, parse_broker_url(f"redis://fastaphlict:{PASSWORD}@127.0.0.1:1/0"))
    for _n in range(3):
        broker.relay("default", {}, b"{}")
    stats = broker.stats
    stats.published, stats.dropped, stats.reconnects = 1_000_003, 1_000_010, 1_000_017
    stats.received, stats.publish_failures = 1_000_024, 1_000_031
    for seconds in (0.0001, 0.003, 0.003, 7.0):
        stats.latency.observe(seconds)
    text = metrics.render(metrics.make_registry(hub, None, broker)).decode()
    assert PASSWORD not in text and "fastaphlict:" not in text
    m = parse(text)
    for name in BROKER_SERIES:
        assert (name, ()) in m, name
    assert m[("fastaphlict_broker_up", ())] == 0, "never started: down"
    assert m[("fastaphlict_broker_buffered", ())] == 3
    assert m[("fastaphlict_broker_published_total", ())] == 1_000_003
    assert m[("fastaphlict_broker_dropped_total", ())] == 1_000_010
    assert m[("fastaphlict_broker_reconnects_total", ())] == 1_000_017
    assert m[("fastaphlict_broker_received_total", ())] == 1_000_024
    assert m[("fastaphlict_broker_publish_failures_total", ())] == 1_000_031
    assert m[("fastaphlict_broker_publish_seconds_count", ())] == 4
    assert m[("fastaphlict_broker_publish_seconds_sum", ())] == pytest.approx(7.0061)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in m.items()
        if name == "fastaphlict_broker_publish_seconds_bucket"
    }
    assert len(buckets) == len(LATENCY_BUCKETS)
    assert (buckets["0.0005"], buckets["0.0025"], buckets["0.005"]) == (1, 1, 3)
    assert (buckets["5.0"] if "5.0" in buckets else buckets["2.5"], buckets["+Inf"]) == (3, 4)


async def test_every_broker_counter_is_exported() -> None:
    """A counter the broker keeps but /metrics doesn't show is invisible in production."""
    hub = Hub("ME")
    broker = Broker(hub, parse_broker_url("redis://127.0.0.1:1/0"))
    counters = [f.name for f in dataclasses.fields(broker.stats)]
    for n, name in enumerate(counters):
        setattr(broker.stats, name, 2_000_003 + 7 * n)
    values = set(parse(metrics.render(metrics.make_registry(hub, None, broker)).decode()).values())
    missing = [n for n in counters if getattr(broker.stats, n) not in values]
    assert not missing, f"broker counters not exported: {missing}"


async def test_without_a_broker_there_are_no_broker_series() -> None:
    text = metrics.render(metrics.make_registry(Hub("ME"))).decode()
    assert "fastaphlict_broker_" not in text


async def test_a_node_whose_redis_is_down_shows_it_and_keeps_posts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = parse_broker_url(f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0")
    async with run(settings(limits=Limits(broker_timeout=0.5), broker=broker)) as srv:
        server = srv.server
        assert (await srv.post({"subscribers": []})).status == 200
        m = await scrape(srv)
        async with srv.session.get(f"{srv.admin_url}/metrics") as resp:
            text = await resp.text()
        status = await srv.status()
    assert m[("fastaphlict_broker_up", ())] == 0
    assert m[("fastaphlict_broker_buffered", ())] == 1
    assert m[("fastaphlict_broker_published_total", ())] == 0
    assert PASSWORD not in text and PASSWORD not in str(status)
    assert PASSWORD not in caplog.text
    assert "unreachable at start" in caplog.text
    assert server.broker is not None and server.broker.stats.dropped == 1, (
        "no state directory: the unpublished post is dropped at the stop"
    )


async def test_a_connected_node_shows_up_and_its_publishes(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as redis:
        limits = Limits(broker_probe_interval=0.05)
        async with run(settings([f"--broker={redis.url}"], limits=limits)) as srv:
            server = srv.server
            assert server.broker is not None
            await srv.broker_up()
            assert (await srv.post({"subscribers": []})).status == 200
            await eventually(lambda: server.broker.stats.published == 1)
            m = await scrape(srv)
            async with srv.session.get(f"{srv.admin_url}/metrics") as resp:
                text = await resp.text()
    assert m[("fastaphlict_broker_up", ())] == 1
    assert m[("fastaphlict_broker_buffered", ())] == 0
    assert m[("fastaphlict_broker_published_total", ())] == 1
    assert m[("fastaphlict_broker_publish_seconds_count", ())] == 1
    assert m[("fastaphlict_broker_dropped_total", ())] == 0
    assert PASSWORD not in text
