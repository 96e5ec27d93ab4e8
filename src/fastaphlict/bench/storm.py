"""The reconnect storm: every tab reconnects, subscribes, replays and pings at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from array import array
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson
from picows import WSMsgType, ws_connect

from fastaphlict.bench.floor import recv_from
from fastaphlict.bench.model import (
    PING,
    REPLAY,
    Model,
    Options,
    Result,
    build_model,
    client_ssl_context,
    effective_connect_concurrency,
    percentile,
)
from fastaphlict.bench.posting import PostStats, post_range
from fastaphlict.bench.procfs import (
    check_fd_budget,
    cpu_ticks,
    server_cpu_seconds,
    server_rss_bytes,
)
from fastaphlict.bench.tabs import StormTab, client_url_for, close_tabs, no_gc

# -- the reconnect storm --------------------------------------------------------


def _watch_worker(
    conn: Connection, url: str, phid: str, interval: float, ca_file: str | None = None
) -> None:
    """The watcher process: one tab that pings every ``interval`` s until told to stop.

    It lives in its own process so that the generator's work (thousands of
    handshakes, every replayed frame) does not delay its pongs: what it
    measures is how long the server leaves an established tab unanswered.
    """
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    conn.send(runner(_watch(conn, url, phid, interval, ca_file)))
    conn.close()


async def _watch(
    conn: Connection, url: str, phid: str, interval: float, ca_file: str | None
) -> list[int]:
    _, tab = await asyncio.wait_for(
        ws_connect(
            StormTab,
            url,
            ssl_context=client_ssl_context(url, ca_file),
            use_aiofastnet=False,
            websocket_handshake_timeout=10.0,
        ),
        10.0,
    )
    assert isinstance(tab, StormTab) and tab.transport is not None
    transport = tab.transport
    loop = asyncio.get_running_loop()
    transport.send(WSMsgType.TEXT, orjson.dumps({"command": "subscribe", "data": [phid]}))
    rtts: list[int] = []
    ready = False
    while not conn.poll():
        tab.pong = loop.create_future()
        start = time.monotonic_ns()
        transport.send(WSMsgType.TEXT, PING)
        await asyncio.wait_for(tab.pong, 60.0)
        if ready:
            rtts.append(time.monotonic_ns() - start)
        else:  # the first round only proves the subscription; the parent waits for it
            conn.send("ready")
            ready = True
        await asyncio.sleep(interval)
    transport.disconnect()
    return rtts


#: Aphlict keeps 60 s of history; past this the oldest posts may be gone.
HISTORY_SECONDS = 55


def _check_replays(tabs: Sequence[StormTab], expected: list[array], result: Result) -> None:
    """Compare each tab's replayed ids with its expected list; fill ``result``'s counts."""
    received = matched = 0
    for tab in tabs:
        want, got = expected[tab.index], tab.ids
        received += len(got)
        result.foreign_frames += tab.foreign
        if got == want and not tab.late:
            matched += len(want)
            continue
        result.replay_tabs_wrong += 1
        got_set, want_set = set(got), set(want)
        matched += len(got_set & want_set)
        result.unexpected += len(got_set - want_set)
        result.duplicates += len(got) - len(got_set)
        if list(got) != sorted(got):
            result.out_of_order += 1
        result.out_of_order += tab.late
    result.replay_frames_received = received
    result.deliveries_received = matched
    result.loss = result.deliveries_expected - matched
    if len(tabs) < result.sockets:
        result.notes.append(f"only {len(tabs)} of {result.sockets} tabs connected")


def _expected_replays(model: Model) -> list[array]:
    """Per tab, the history indices it must be replayed, oldest first (the post order)."""
    expected = [array("i") for _ in model.subscriptions]
    for m, group in enumerate(model.targets):
        for s in group:
            expected[s].append(m)
    return expected


async def _history_size(opts: Options) -> int:
    """``history.size`` from ``/status/`` (0 when unreadable: the check is a courtesy)."""
    query = f"instance={quote(opts.instance, safe='')}" if opts.instance else ""
    url = urlunsplit(urlsplit(opts.admin_url)._replace(path="/status/", query=query))
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return int((await resp.json(content_type=None)).get("history.size") or 0)
    except (aiohttp.ClientError, ValueError, TypeError, AttributeError):
        return 0


async def _post_history(opts: Options, model: Model, result: Result) -> None:
    """Post the busy minute one message at a time, so the history's order is the index order."""
    stats = PostStats()
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        await post_range(opts, model, session, 0, len(model.messages), stats)
    result.post_errors = stats.errors
    result.first_post_error = stats.first_error


async def run_storm(opts: Options) -> Result:
    """A node restart: every tab reconnects at once and does what JX.Aphlict does.

    Order: post ``history`` messages (Phorge-shaped, one at a time); start the
    watcher (another process, one tab pinging every ``watch_interval``); read
    the server's CPU; open ``sockets`` tabs with at most
    ``connect_concurrency`` handshakes in flight, each sending ``subscribe``
    (its PHIDs), ``replay`` ``{"age":60000}`` and ``ping`` as soon as it is
    open; wait for every pong; read the CPU again. A tab's replay is checked
    against the model: exactly the history messages naming one of its PHIDs,
    once each, oldest first, all before its pong.
    """
    check_fd_budget(opts.sockets + 1)
    model = build_model(opts)
    expected = _expected_replays(model)
    result = Result(
        scenario="storm",
        sockets=opts.sockets,
        messages=len(model.messages),
        concurrency=effective_connect_concurrency(opts),
        rate=0.0,
        windows=0,
        history=len(model.messages),
        deliveries_expected=model.expected,
        replay_frames_expected=model.expected,
    )
    pid = opts.server_pid
    url = client_url_for(opts)
    ssl_context = client_ssl_context(url, opts.ca_file)
    ticks0 = cpu_ticks()
    held = await _history_size(opts)
    if held:
        raise RuntimeError(
            f"the server already holds {held} history messages: a storm needs a fresh server"
            " (or one idle for 60 s), or its replays cannot be checked"
        )
    posted = time.monotonic()
    if model.messages:
        await _post_history(opts, model, result)

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    watcher = ctx.Process(
        target=_watch_worker,
        args=(child, url, "PHID-USER-watcher000000000000", opts.watch_interval, opts.ca_file),
        daemon=True,
    )
    watcher.start()
    child.close()
    tabs: list[StormTab] = []
    loop = asyncio.get_running_loop()
    try:
        if await recv_from(parent, watcher, 30.0) != "ready":
            raise RuntimeError("the watcher tab did not start")
        limit = asyncio.Semaphore(effective_connect_concurrency(opts))
        pongs: list[asyncio.Future[None]] = []

        async def reconnect(i: int) -> None:
            subscribe = orjson.dumps({"command": "subscribe", "data": model.subscriptions[i]})
            last: BaseException | None = None
            for attempt in range(3):
                try:
                    async with limit:  # a slot per handshake, not per replay
                        _, tab = await asyncio.wait_for(
                            ws_connect(
                                StormTab,
                                url,
                                ssl_context=ssl_context,
                                use_aiofastnet=False,
                                websocket_handshake_timeout=opts.deadline,
                                max_frame_size=16 * 1024 * 1024,
                            ),
                            opts.deadline,
                        )
                except (OSError, asyncio.TimeoutError) as exc:
                    last = exc
                    result.connect_retries += attempt < 2
                    await asyncio.sleep(0.2)
                    continue
                assert isinstance(tab, StormTab) and tab.transport is not None
                tab.pong = loop.create_future()
                pongs.append(tab.pong)
                tabs.append(tab)
                tab.index = i
                send = tab.transport.send
                send(WSMsgType.TEXT, subscribe)
                send(WSMsgType.TEXT, REPLAY)
                send(WSMsgType.TEXT, PING)
                return
            raise ConnectionError(f"tab {i}: cannot connect to {url}: {last!r}")

        with no_gc():
            cpu0 = server_cpu_seconds(pid) if pid else 0.0
            start = time.monotonic_ns()
            await asyncio.gather(*(reconnect(i) for i in range(opts.sockets)))
            await asyncio.wait_for(asyncio.gather(*pongs), opts.deadline * 6)
            last_pong = max(tab.pong_ns for tab in tabs)
            cpu = (server_cpu_seconds(pid) if pid else 0.0) - cpu0
        result.storm_wall_s = result.elapsed_s = (last_pong - start) / 1e9
        if pid:
            result.server_cpu_s = cpu
            result.server_cpu_per_tab_us = cpu / opts.sockets * 1e6
            result.server_rss_mb = server_rss_bytes(pid) / 2**20
        if time.monotonic() - posted > HISTORY_SECONDS:
            result.notes.append(
                f"the storm ended over {HISTORY_SECONDS} s after the first post: "
                "servers may have purged the oldest history"
            )
        parent.send("stop")
        rtts = sorted(await recv_from(parent, watcher, 30.0))
        if rtts:
            result.watcher_pings = len(rtts)
            result.watcher_ping_p50_ms = percentile(rtts, 0.50)
            result.watcher_ping_p99_ms = percentile(rtts, 0.99)
            result.watcher_ping_max_ms = rtts[-1] / 1e6
        await asyncio.sleep(0.2)  # a frame sent after a pong would show up now
        _check_replays(tabs, expected, result)
    finally:
        await close_tabs(tabs)
        parent.close()
        await loop.run_in_executor(None, watcher.join, 10.0)
        if watcher.is_alive():
            watcher.kill()
    ticks1 = cpu_ticks()
    if ticks1[0] > ticks0[0]:
        result.steal_pct = (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) * 100
    return result
