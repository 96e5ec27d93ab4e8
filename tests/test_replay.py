"""Replay: what it selects, what it costs, and how it reaches a tab (spec §2 ``replay``, §4).

The selection is checked against a plain-Python model of Aphlict's rule. The
delivery is checked end to end: a replay far bigger than the slow-client cap
reaches a tab that reads it, whole and in order, with live messages and the
``pong`` behind it; a tab that stops reading is closed with 1013.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastaphlict import client as client_module
from fastaphlict._fanout import Subscriber
from fastaphlict._history import History
from fastaphlict.hub import HISTORY_LIMIT, HISTORY_TTL_MS
from fastaphlict.server import Limits
from support import TIMEOUT, Browser, eventually, running, scaled

# -- selection, without sockets ----------------------------------------------------

PHIDS = ["A", "B", "C", "D", "E"]
subscriber_lists = st.one_of(
    st.lists(st.one_of(st.sampled_from(PHIDS), st.integers(0, 2), st.none()), max_size=6),
    st.sampled_from(["A", None, {"A": 1}]),
)


@given(
    posts=st.lists(st.tuples(st.integers(0, 400), subscriber_lists), max_size=40),
    wanted=st.lists(st.sampled_from([*PHIDS, "Z"]), max_size=6),
    age=st.integers(-5, 500),
    limit=st.integers(1, 12),
)
@settings(max_examples=300, deadline=None)
def test_select_matches_aphlicts_rule(
    posts: list[tuple[int, Any]], wanted: list[str], age: int, limit: int
) -> None:
    ttl = 300.0
    history = History(limit, ttl)
    model: list[tuple[float, Any, bytes]] = []
    at = 0.0
    for n, (step, subscribers) in enumerate(posts):
        at += step
        frame = b"%d" % n
        history.add(at, subscribers, frame)
        model.append((at, subscribers, frame))
    now = at + 1
    live = [e for e in model[-limit:] if e[0] >= now - ttl] if model else []
    expected = [
        frame
        for when, subscribers, frame in live
        if age >= 0
        and when >= now - age
        and isinstance(subscribers, list)
        and any(isinstance(p, str) and p in wanted for p in subscribers)
    ]
    assert history.select(wanted, now, age) == expected
    assert history.select(set(wanted), now, age) == expected
    assert len(history) == len(live)
    if not live:
        assert history.phid_count == 0, "the index lets go of everything that left"


def test_clock_stepping_back_keeps_the_window_contiguous() -> None:
    history = History()
    history.add(10_000.0, ["A"], b"1")
    history.add(4_000.0, ["A"], b"2")  # the wall clock stepped back 6 s
    assert history.newest() == 10_000.0
    assert history.select(["A"], 10_000.0, 1) == [b"1", b"2"]


def test_a_hostile_replay_costs_lookups_not_a_product() -> None:
    # A tab with 4096 subscriptions replaying a full history of 4096 entries
    # naming 21 subscribers each. Comparing every subscription with every
    # subscriber is 350 million steps (seconds); the index makes it 4096
    # lookups plus the matched entries. The bound is two orders of magnitude
    # above what the index needs and far below the product: it only catches
    # a return of the product. (benchmarks/test_micro_replay.py measures it.)
    history = History()
    for n in range(HISTORY_LIMIT):
        subscribers = [f"PHID-USER-{(n * 21 + i) % 4096:020d}" for i in range(21)]
        history.add(1000.0, subscribers, b"x" * 40)
    strangers = [f"PHID-NONE-{i:020d}" for i in range(4096)]
    everyone = [f"PHID-USER-{i:020d}" for i in range(4096)]
    for phids in (strangers, everyone):
        start = time.perf_counter()
        frames = history.select(phids, 1000.0, HISTORY_TTL_MS)
        elapsed = time.perf_counter() - start
        assert elapsed < scaled(0.25), f"{len(phids)} PHIDs took {elapsed * 1000:.1f} ms"
    assert len(frames) == HISTORY_LIMIT


# -- delivery, end to end ------------------------------------------------------------

BIG = 2048


def _message(n: int, phid: str = "PHID-A") -> dict[str, Any]:
    return {"key": str(n), "type": "notification", "subscribers": [phid], "n": n, "pad": ""}


def _publish_history(hub: Any, count: int, size: int = BIG) -> None:
    # Straight into the hub: 4096 HTTP posts would only slow the test down;
    # posting the Phorge way is covered by the admin tests.
    for n in range(count):
        message = _message(n)
        message["pad"] = "p" * (size - len(json.dumps(message)))
        hub.publish("default", message)


def _server_side(srv: Any) -> Subscriber:
    (inst,) = [i for i in srv.hub.instances() if i.name == "default"]
    (sub,) = inst.channel.subscribers()
    return sub


async def test_a_replay_far_over_the_cap_reaches_a_reading_tab_whole() -> None:
    async with running() as srv:
        _publish_history(srv.hub, HISTORY_LIMIT)
        async with connect(srv.client_url(), open_timeout=TIMEOUT, max_queue=4) as ws:
            browser = Browser(ws)
            await browser.subscribe("PHID-A")
            await browser.send("replay", {"age": 60_000})
            await browser.send("ping")
            for n in range(HISTORY_LIMIT):
                frame = await browser.recv_raw()
                assert isinstance(frame, str) and len(frame) >= BIG
                assert json.loads(frame)["n"] == n
            assert await browser.recv_raw() == '{"type":"pong"}', "pong after the replay"
            await browser.sync()  # still open, still answering
        assert srv.hub.stats.slow_disconnects == 0
        assert srv.hub.stats.replayed == HISTORY_LIMIT


def _slow_reader(port: int) -> socket.socket:
    """A connected TCP socket whose receive window stays tiny: a tab that reads slowly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def _paced_replay(srv: Any, **options: Any) -> AsyncIterator[tuple[Browser, Subscriber]]:
    """A tab on a tiny receive window that asked for the whole history: its replay waits."""
    sock = _slow_reader(srv.server.client_ports[0])
    async with connect(
        srv.client_url(), sock=sock, open_timeout=TIMEOUT, max_queue=1, **options
    ) as ws:
        browser = Browser(ws)
        await browser.subscribe("PHID-A")
        await browser.send("replay", None)
        sub = _server_side(srv)
        await eventually(
            lambda: sub.replaying or sub.slow, what="the replay is paced, not written at once"
        )
        yield browser, sub


async def test_live_messages_and_pong_wait_behind_a_paced_replay_in_order() -> None:
    async with running() as srv:
        _publish_history(srv.hub, HISTORY_LIMIT)
        async with _paced_replay(srv) as (browser, sub):
            live = [HISTORY_LIMIT + i for i in range(3)]
            for n in live:
                response = await srv.post(_message(n))
                assert response.status == 200
            await browser.send("ping")
            received = []
            while (frame := await browser.recv_raw()) != '{"type":"pong"}':
                received.append(json.loads(frame)["n"])
            # History holds the newest 4096 messages; the live ones joined it
            # only after the replay chose its frames, so each arrives once.
            assert received == [*range(HISTORY_LIMIT), *live]
            assert not sub.replaying
        assert srv.hub.stats.slow_disconnects == 0


async def _wait_closed(ws: Any) -> int | None:
    """Read until the server closes; the close code it sent."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    return ws.close_code


async def test_a_tab_that_stops_reading_a_replay_is_closed_after_a_sweep_round() -> None:
    async with running(limits=Limits(ping_interval=0.2)) as srv:
        _publish_history(srv.hub, HISTORY_LIMIT)
        async with _paced_replay(srv, ping_interval=None) as (browser, _):
            await eventually(lambda: srv.hub.stats.slow_disconnects == 1, what="closed as too slow")
            assert await _wait_closed(browser.ws) == 1013
        assert srv.hub.stats.slow_disconnects == 1


async def test_live_traffic_past_the_cap_behind_a_stalled_replay_closes_the_tab() -> None:
    cap = 64 * 1024
    async with running(limits=Limits(ping_interval=0, max_buffered=cap)) as srv:
        _publish_history(srv.hub, HISTORY_LIMIT)
        async with _paced_replay(srv) as (browser, _):
            for n in range(cap // BIG + 2):
                srv.hub.publish("default", _message(HISTORY_LIMIT + n) | {"pad": "p" * BIG})
                await asyncio.sleep(0)
            await eventually(
                lambda: srv.hub.stats.slow_disconnects == 1, what="closed past the cap"
            )
            assert await _wait_closed(browser.ws) == 1013


async def test_a_slow_client_is_closed_and_counted_once() -> None:
    # pause_writing fires again whenever a socket drains a little and fills
    # up again; the second time must not count or close it again.
    async with running() as srv, srv.client() as browser:
        await browser.sync()
        sub = _server_side(srv)
        cap = srv.server.limits.max_buffered
        client_module.close_slow(srv.hub, sub, cap)
        client_module.close_slow(srv.hub, sub, cap)
        assert srv.hub.stats.slow_disconnects == 1
        assert await _wait_closed(browser.ws) == 1013


async def test_replays_asked_again_and_again_without_reading_close_the_tab() -> None:
    # Each replay queues references to up to 4096 history frames; a tab that
    # keeps asking and never reads would pile them up without bound.
    async with running(limits=Limits(ping_interval=0)) as srv:
        _publish_history(srv.hub, HISTORY_LIMIT)
        async with _paced_replay(srv) as (browser, _):
            for _ in range(4):
                await browser.send("replay", None)
            await eventually(lambda: srv.hub.stats.slow_disconnects == 1, what="closed as slow")
            assert await _wait_closed(browser.ws) == 1013
        assert srv.hub.stats.slow_disconnects == 1
