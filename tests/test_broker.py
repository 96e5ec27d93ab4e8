"""The Redis broker, end to end: real ``redis-server``, real fastaphlict processes.

Each test starts its own Redis (``redis_server``, append-only so it can be
stopped and started again with its data) and its own nodes, each given the
broker through ``FASTAPHLICT_BROKER`` as docs/clusters.md recommends. Probes run
every 0.2 s and every Redis call has 0.5 s, so a stalled or lost broker is
found within about a second.

Delivery is checked field by field on real WebSocket clients. A message
that must *not* arrive (a duplicate) is disproved by a ping whose pong must
be the next frame, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from fastaphlict import broker as broker_module
from redis_support import (
    FAST,
    RECOVERY,
    RedisServer,
    StallProxy,
    broker_up,
    until_down,
    until_metric,
    until_up,
)
from support import (
    TIMEOUT,
    Browser,
    ServerProcess,
    assert_silent,
    client_frame,
    eventually,
    free_ports,
    metric,
    post,
    replayed,
    scaled,
    spawn,
    spawn_node_aphlict,
    stop,
    upgrade_request,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(90)


Start = Callable[..., ServerProcess]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Start]:
    """Start fastaphlict nodes of a broker cluster; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(
        name: str,
        broker: str | None,
        *args: str,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        ports: tuple[int, int] | None = None,
    ) -> ServerProcess:
        extra = dict(env or {})
        if broker is not None:
            extra["FASTAPHLICT_BROKER"] = broker
        server = spawn(
            tmp_path / f"{name}.log", *FAST, *args, config=config, env=extra, ports=ports
        )
        started.append(server)
        return server

    yield start
    stop(*started)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@contextlib.asynccontextmanager
async def tab(server: ServerProcess, *phids: str, path: str = "/") -> AsyncIterator[Browser]:
    """A browser tab on ``server``, subscribed to ``phids`` (synchronised by ping)."""
    async with connect(f"{server.client_url}{path}", open_timeout=TIMEOUT) as ws:
        browser = Browser(ws)
        if phids:
            await browser.subscribe(*phids)
        yield browser


async def publish(
    session: aiohttp.ClientSession,
    server: ServerProcess,
    key: str,
    *subscribers: str,
    instance: str | None = None,
) -> None:
    """Post one story as Phorge does; the node must answer 200 at once."""
    resp = await post(
        session,
        server.admin_url,
        {"key": key, "type": "notification", "subscribers": list(subscribers)},
        instance=instance,
    )
    assert resp.status == 200


async def keys_of(browser: Browser, count: int) -> list[str]:
    """The ``key`` of the next ``count`` frames (each must be a message, not a pong)."""
    keys = []
    for _ in range(count):
        message = await browser.recv()
        assert message.get("type") == "notification", message
        keys.append(message["key"])
    return keys


@contextlib.contextmanager
def logs_on_failure(*servers: ServerProcess) -> Iterator[None]:
    """A failure or a timeout inside carries the nodes' logs: a flaky run explains itself."""
    try:
        yield
    except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
        logs = "\n".join(f"--- {s.log_path.name}:\n{s.log()[-3000:]}" for s in servers)
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{logs}") from exc


# -- delivery ---------------------------------------------------------------------


async def test_every_tab_on_every_node_gets_each_message_once_in_order_per_origin(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b, c = (nodes(name, redis_server.url) for name in "abc")
    await until_up(session, a, b, c)
    async with tab(a, "PHID-USER-1") as ta, tab(b, "PHID-USER-1") as tb, tab(c, "PHID-X") as tc:
        for i in range(10):
            await publish(session, a, f"a{i}", "PHID-USER-1")
            await publish(session, b, f"b{i}", "PHID-USER-1")
        for browser in (ta, tb):
            got = await keys_of(browser, 20)
            assert sorted(got) == sorted(
                [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
            )
            assert [k for k in got if k[0] == "a"] == [f"a{i}" for i in range(10)], "order of a"
            assert [k for k in got if k[0] == "b"] == [f"b{i}" for i in range(10)], "order of b"
            await assert_silent(browser)  # nothing arrived twice
        await assert_silent(tc)  # not subscribed: nothing
    status = json.loads(await (await session.get(f"{b.admin_url}/status/")).read())
    assert status["messages.in"] == 20, "a node counts what it took in, from Phorge or Redis"


async def test_the_posting_node_delivers_without_waiting_for_redis(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a = nodes("a", redis_server.url)
    await until_up(session, a)
    redis_server.pause()  # every Redis call now hangs
    try:
        async with tab(a, "PHID-1") as ta:
            started = asyncio.get_running_loop().time()
            await publish(session, a, "k1", "PHID-1")
            assert await keys_of(ta, 1) == ["k1"]
            assert asyncio.get_running_loop().time() - started < scaled(0.4)
    finally:
        redis_server.resume()


async def test_a_message_carries_the_posting_nodes_fingerprint_in_touched(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1") as tb:
        body = b'{"key":"k","subscribers":["PHID-1"]}'
        async with session.post(f"{a.admin_url}/", data=body) as resp:
            fingerprint = json.loads(await resp.read())["fingerprint"]
        message = await tb.recv()
        assert message == {"key": "k", "subscribers": ["PHID-1"], "touched": [fingerprint]}


# -- history ------------------------------------------------------------------------


async def test_a_replay_on_another_node_returns_the_shared_window_of_its_instance(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    for i in range(3):
        await publish(session, a, f"one{i}", "PHID-1", instance="one")
        await publish(session, a, f"two{i}", "PHID-1", instance="two")
    await publish(session, a, "other", "PHID-2", instance="one")

    # The broker may still be carrying the last posts to B: wait for them.
    async def all_there() -> bool:
        async with session.get(f"{b.admin_url}/status/?instance=one") as resp:
            return (await resp.json())["history.size"] == 4  # type: ignore[no-any-return]

    await eventually(all_there, TIMEOUT, "4 messages of instance one on B", every=0.02)
    async with tab(b, "PHID-1", path="/~one/") as tb:
        got = await replayed(tb)
        assert got == ["one0", "one1", "one2"]


async def test_the_history_outlives_every_node(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1") as tb:
        for i in range(5):
            await publish(session, a, f"k{i}", "PHID-1")
        assert await keys_of(tb, 5) == [f"k{i}" for i in range(5)]  # all in Redis now
    stop(a, b)
    c = nodes("c", redis_server.url)
    await until_up(session, c)
    async with tab(c, "PHID-1") as tc:
        assert await replayed(tc) == [f"k{i}" for i in range(5)]
    status = json.loads(await (await session.get(f"{c.admin_url}/status/")).read())
    assert status["history.size"] == 5
    assert status["messages.in"] == 0, "a warmed history is not traffic this node took in"
    assert status["history.age"] < 10000, "ages count from the first acceptance"
    assert "history in sync (5 message(s) from Redis)" in c.log()


async def test_a_crashed_nodes_tab_moves_over_and_replays_what_was_posted_before(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(a, "PHID-1") as ta, tab(b, "PHID-1") as tb:
        await publish(session, a, "before", "PHID-1")
        assert await keys_of(ta, 1) == ["before"]
        assert await keys_of(tb, 1) == ["before"]
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(TIMEOUT)
        await publish(session, b, "after", "PHID-1")
        assert await keys_of(tb, 1) == ["after"], "the survivor keeps delivering"
    async with tab(b, "PHID-1") as moved:
        assert await replayed(moved) == ["before", "after"]


# -- faults -----------------------------------------------------------------------


async def test_redis_restarted_mid_stream_loses_nothing_and_duplicates_nothing(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(a, "PHID-1") as ta, tab(b, "PHID-1") as tb:
        await publish(session, a, "a0", "PHID-1")
        assert await keys_of(ta, 1) == ["a0"]
        assert await keys_of(tb, 1) == ["a0"]

        redis_server.stop()
        for i in range(1, 4):
            await publish(session, a, f"a{i}", "PHID-1")
            await publish(session, b, f"b{i}", "PHID-1")
        # Each node's own tabs have their node's posts at once.
        assert await keys_of(ta, 3) == ["a1", "a2", "a3"]
        assert await keys_of(tb, 3) == ["b1", "b2", "b3"]
        await until_down(session, a)
        assert await metric(session, a.admin_url, "fastaphlict_broker_buffered") == 3

        redis_server.start()
        # The other node's posts arrive late, once, in order.
        assert await asyncio.wait_for(keys_of(ta, 3), RECOVERY) == ["b1", "b2", "b3"]
        assert await asyncio.wait_for(keys_of(tb, 3), RECOVERY) == ["a1", "a2", "a3"]
        await until_up(session, a, b)
        await publish(session, a, "a4", "PHID-1")
        for browser in (ta, tb):
            assert await keys_of(browser, 1) == ["a4"], "and nothing twice before it"
            await assert_silent(browser)
    assert await metric(session, a.admin_url, "fastaphlict_broker_buffered") == 0
    assert await metric(session, a.admin_url, "fastaphlict_broker_reconnects_total") >= 1
    for server in (a, b):
        log = server.log()
        assert log.count("down:") == 1, log
        assert log.count("back after") == 1, log
        # The line accounts for every message that waited: the 3 went out then, or wait
        # (a restarted Redis is another server: what it acknowledged before goes again).
        [back] = [line for line in log.splitlines() if "back after" in line]
        ours = r"(\d+) message\(s\) of this node published(?: \((\d+) of them again)?"
        found = re.search(ours, back)
        waiting = re.search(r"(\d+) still waiting", back)
        assert found and waiting, back
        published, again = int(found[1]), int(found[2] or 0)
        assert published - again + int(waiting[1]) == 3, back


async def test_a_node_cut_off_catches_up_on_what_others_published_meanwhile(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        a = nodes("a", redis_server.url)
        b = nodes("b", f"redis://127.0.0.1:{proxy.port}/0")
        await until_up(session, a, b)
        async with tab(b, "PHID-1") as tb:
            proxy.cut()  # B's connections drop; A and Redis are fine
            for i in range(5):
                await publish(session, a, f"k{i}", "PHID-1")
            assert await asyncio.wait_for(keys_of(tb, 5), RECOVERY) == [f"k{i}" for i in range(5)]
            await assert_silent(tb)


async def test_a_subscription_that_stays_up_but_goes_silent_is_found_and_rebuilt(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        a = nodes("a", redis_server.url)
        b = nodes("b", f"redis://127.0.0.1:{proxy.port}/0")
        await until_up(session, a, b)
        async with tab(b, "PHID-1") as tb:
            accepted = proxy.accepted
            proxy.stall()  # nothing is closed: B's sockets just stop delivering
            await publish(session, a, "during", "PHID-1")
            await until_down(session, b)
            # B gave up on the silent link and is trying a new one...
            await eventually(lambda: "subscription stalled" in b.log(), RECOVERY, what="stall")
            await eventually(lambda: proxy.accepted > accepted, RECOVERY, what="a reconnection")
            # ...and the old link's held data is lost: only the catch-up can bring it.
            proxy.cut()
            proxy.unstall()
            assert await asyncio.wait_for(keys_of(tb, 1), RECOVERY) == ["during"]
            await until_up(session, b)
            await publish(session, a, "after", "PHID-1")
            assert await keys_of(tb, 1) == ["after"]
            await assert_silent(tb)
    assert "down:" in b.log() and "back after" in b.log(), b.log()


async def test_a_paused_redis_is_detected_and_recovered(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1") as tb:
        redis_server.pause()
        try:
            await publish(session, a, "paused", "PHID-1")
            await until_down(session, a)
            await until_down(session, b)
        finally:
            redis_server.resume()
        assert await asyncio.wait_for(keys_of(tb, 1), RECOVERY) == ["paused"]
        await until_up(session, a, b)
        await assert_silent(tb)


async def test_a_node_starts_without_redis_and_joins_when_it_comes(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    redis_server.stop()
    a = nodes("a", redis_server.url)
    await wait_healthy(a, session)
    assert await broker_up(session, a) == 0
    assert "unreachable at start" in a.log()
    async with tab(a, "PHID-1") as ta:
        await publish(session, a, "alone", "PHID-1")
        assert await keys_of(ta, 1) == ["alone"], "its own tabs are served meanwhile"
        redis_server.start()
        b = nodes("b", redis_server.url)
        await until_up(session, a, b)
        async with tab(b, "PHID-1") as tb:
            assert await replayed(tb) == ["alone"], "published once Redis came"
            await publish(session, b, "from-b", "PHID-1")
            assert await keys_of(ta, 1) == ["from-b"]
            await assert_silent(ta)


async def test_messages_waiting_for_redis_at_a_stop_go_to_the_state_dir_and_out_at_the_next_start(
    tmp_path: Path, redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    state = tmp_path / "state"
    a = nodes("a", redis_server.url, f"--state-dir={state}")
    b = nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1") as tb:
        redis_server.stop()
        accepted = asyncio.get_running_loop().time()
        await publish(session, a, "kept1", "PHID-1")
        await publish(session, a, "kept2", "PHID-1")
        stop(a)
        assert "2 unpublished message(s) kept in" in a.log()
        assert (state / "broker-pending.jsonl").exists()
        redis_server.start()
        a2 = a.restart()
        await until_up(session, a2, b)
        assert await asyncio.wait_for(keys_of(tb, 2), RECOVERY) == ["kept1", "kept2"]
        await assert_silent(tb)
        # Their age counts from when A first accepted them, not from Redis.
        elapsed_ms = (asyncio.get_running_loop().time() - accepted) * 1000
        async with session.get(f"{b.admin_url}/status/") as resp:
            status = await resp.json()
        assert status["history.size"] == 2
        assert status["history.age"] >= elapsed_ms - 250, (status, elapsed_ms)
    assert not (state / "broker-pending.jsonl").exists()
    async with tab(a2, "PHID-1") as ta:
        assert await replayed(ta) == ["kept1", "kept2"], "in the restarted node's history once"
    stop(a2)


async def test_saved_messages_stay_on_disk_through_a_kill_until_redis_has_them(
    tmp_path: Path, redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """Read at start is not published: an OOM kill while Redis is away must not lose them."""
    state = tmp_path / "state"
    pending = state / "broker-pending.jsonl"
    a = nodes("a", redis_server.url, f"--state-dir={state}")
    b = nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1") as tb:
        redis_server.stop()
        await publish(session, a, "kept", "PHID-1")
        stop(a)
        a2 = a.restart()
        try:
            await wait_healthy(a2, session)
            assert "1 saved message(s) to publish" in a2.log()
            assert pending.exists(), "kept until Redis acknowledges them"
        finally:
            a2.proc.kill()  # an OOM kill: nothing is written at exit
            a2.proc.wait()
        redis_server.start()
        a3 = a2.restart()
        try:
            with logs_on_failure(a3, b):
                await until_up(session, a3, b)
                assert await asyncio.wait_for(keys_of(tb, 1), RECOVERY) == ["kept"]
                await assert_silent(tb)
                await eventually(
                    _gone(pending), RECOVERY, "the saved file removed once published", every=0.02
                )
        finally:
            stop(a3)
    assert not pending.exists()


def _gone(path: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not path.exists()

    return check


async def test_a_node_back_while_redis_is_away_delivers_what_it_missed_when_redis_returns(
    tmp_path: Path, redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """Its tabs replayed an incomplete history: the first sync gives them the rest, once."""
    a = nodes("a", redis_server.url, f"--state-dir={tmp_path / 'state'}")
    b = nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(a, "PHID-1") as ta:
        await publish(session, b, "before", "PHID-1")
        assert await keys_of(ta, 1) == ["before"]
    stop(a)
    await publish(session, b, "missed", "PHID-1")
    # In Redis before it goes: not published late by B, which A would get live.
    await until_metric(session, b, "fastaphlict_broker_published_total", 2)
    redis_server.stop()
    a2 = a.restart()
    try:
        with logs_on_failure(a2, b):
            await wait_healthy(a2, session)
            async with tab(a2, "PHID-1") as ta:
                assert await replayed(ta) == ["before"], "what the saved history had"
                redis_server.start()
                assert await asyncio.wait_for(keys_of(ta, 1), RECOVERY) == ["missed"]
                await until_up(session, a2, b)
                await publish(session, b, "after", "PHID-1")
                # Neither "missed" again nor "before" (delivered before the stop) came first.
                assert await keys_of(ta, 1) == ["after"]
                await assert_silent(ta)
    finally:
        stop(a2)


async def test_a_node_back_while_redis_is_up_warms_what_it_missed_before_it_serves(
    tmp_path: Path, redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """Warmed before its listeners open: in the history for replays, not counted as taken in."""
    a = nodes("a", redis_server.url, f"--state-dir={tmp_path / 'state'}")
    b = nodes("b", redis_server.url)
    await until_up(session, a, b)
    stop(a)
    for i in range(3):
        await publish(session, b, f"k{i}", "PHID-1")
    await until_metric(session, b, "fastaphlict_broker_published_total", 3)
    a2 = a.restart()
    try:
        await until_up(session, a2)
        async with tab(a2, "PHID-1") as ta:
            assert await replayed(ta) == ["k0", "k1", "k2"]
            await assert_silent(ta)
        status = json.loads(await (await session.get(f"{a2.admin_url}/status/")).read())
        assert status["messages.in"] == 0, "a warmed history is not traffic this node took in"
        assert await metric(session, a2.admin_url, "fastaphlict_broker_received_total") == 0
    finally:
        stop(a2)


async def test_without_a_state_dir_messages_waiting_at_a_stop_are_counted_and_logged(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a = nodes("a", redis_server.url)
    await until_up(session, a)
    redis_server.stop()
    await publish(session, a, "lost", "PHID-1")
    stop(a)
    assert "1 unpublished message(s) dropped at stop" in a.log(), a.log()


# -- secrets --------------------------------------------------------------------------


async def test_the_password_is_in_no_log_line_status_or_metric(
    tmp_path: Path, nodes: Start, session: aiohttp.ClientSession
) -> None:
    secret = "s3cret-Pa55word"
    with RedisServer(tmp_path / "redis-auth", password=secret) as redis:
        good = nodes("good", f"redis://:{secret}@127.0.0.1:{redis.port}/0", "--debug")
        wrong = nodes("wrong", f"redis://:{secret}-wrong@127.0.0.1:{redis.port}/0", "--debug")
        await until_up(session, good)
        await wait_healthy(wrong, session)
        scraped = []
        for server in (good, wrong):
            for path in ("/status/", "/metrics"):
                async with session.get(f"{server.admin_url}{path}") as resp:
                    scraped.append(await resp.text())
        redis.stop()
        await until_down(session, good)
        stop(good, wrong)
    malformed = spawn(
        tmp_path / "malformed.log",
        env={"FASTAPHLICT_BROKER": f"redis://:{secret}@127.0.0.1:notaport/0"},
    )
    assert malformed.proc.wait(TIMEOUT) == 1
    for text in (good.log(), wrong.log(), malformed.log(), *scraped):
        assert secret not in text
    assert "redis://:***@127.0.0.1" in good.log()
    assert "WRONGPASS" in wrong.log() or "invalid" in wrong.log().lower(), wrong.log()
    assert "redis://***@127.0.0.1:notaport/0" in malformed.log(), malformed.log()


# -- several processes, mixed clusters --------------------------------------------------


async def test_processes_sharing_ports_deliver_every_message_to_every_tab_once(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a = nodes("a", redis_server.url, "--reuse-port")
    b = nodes("b", redis_server.url, "--reuse-port", ports=(a.client_port, a.admin_port))
    await wait_healthy(a, session)
    await wait_healthy(b, session)
    await asyncio.sleep(0)
    async with contextlib.AsyncExitStack() as stack:
        tabs = [await stack.enter_async_context(tab(a, "PHID-1")) for _ in range(16)]
        await until_up(session, a)  # whichever process answers; both started in sync
        await eventually(lambda: "connected" in a.log() and "connected" in b.log())
        fresh = aiohttp.TCPConnector(force_close=True)  # a new connection per post
        async with aiohttp.ClientSession(connector=fresh) as posting:
            for i in range(12):
                await publish(posting, a, f"k{i}", "PHID-1")
        for browser in tabs:
            got = await keys_of(browser, 12)
            assert sorted(got, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(12)]
            await assert_silent(browser)


def aphlict_peer(tmp_path: Path, kind: str, ports: list[int], peer_admin: int) -> ServerProcess:
    """The mesh peer of the mixed cluster: fastaphlict without a broker, or Node Aphlict."""
    mesh = [{"host": "127.0.0.1", "port": peer_admin, "protocol": "http"}]
    if kind == "fastaphlict":
        return spawn(tmp_path / "c.log", config={"cluster": mesh}, ports=ports)
    return spawn_node_aphlict(tmp_path / "c.log", ports, mesh)


@pytest.mark.parametrize("kind", ["fastaphlict", "node"])
async def test_a_mesh_peer_of_one_cluster_node_reaches_every_tab_and_the_reverse(
    tmp_path: Path,
    redis_server: RedisServer,
    nodes: Start,
    session: aiohttp.ClientSession,
    kind: str,
) -> None:
    a_ports, b_ports, c_ports = free_ports(2), free_ports(2), free_ports(2)
    # One config file for every cluster node: each lists the mesh peer C.
    mesh = [{"host": "127.0.0.1", "port": c_ports[1], "protocol": "http"}]
    a = nodes("a", redis_server.url, config={"cluster": mesh}, ports=tuple(a_ports))
    b = nodes("b", redis_server.url, config={"cluster": mesh}, ports=tuple(b_ports))
    # C has no broker and peers with A only, as a Node Aphlict being migrated would.
    c = aphlict_peer(tmp_path, kind, c_ports, a_ports[1])
    try:
        await until_up(session, a, b)
        await eventually(lambda: _listening(c_ports[0]), scaled(10), what="C listening")
        # A and B know each other (probes) before anything is posted.
        for server in (a, b):
            await until_metric(session, server, "fastaphlict_broker_nodes", 1)
        async with tab(a, "PHID-1") as ta, tab(b, "PHID-1") as tb, tab(c, "PHID-1") as tc:
            for origin in (c, a, b, c, b, a):
                key = f"from-{origin.log_path.stem}"
                await publish(session, origin, key, "PHID-1")
                for browser in (ta, tb, tc):
                    assert await keys_of(browser, 1) == [key], origin.log_path.stem
            for browser in (ta, tb, tc):
                await assert_silent(browser)
    finally:
        stop(c)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_a_tab_joining_mid_stream_gets_replay_then_live_each_message_once_in_order(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    keys = [f"k{i}" for i in range(40)] + ["end"]
    joined = asyncio.Event()

    async def stream() -> None:
        for i, key in enumerate(keys):
            if i == 15:
                await joined.wait()
            await publish(session, a, key, "PHID-1")

    publisher = asyncio.create_task(stream())
    try:
        # As JX.Aphlict does on (re)connect: subscribe, then replay, in one write.
        reader, writer = await asyncio.open_connection("127.0.0.1", b.client_port)
        writer.write(upgrade_request("/"))
        writer.write(client_frame(b'{"command":"subscribe","data":["PHID-1"]}'))
        writer.write(client_frame(b'{"command":"replay","data":{"age":60000}}'))
        writer.write(client_frame(b'{"command":"ping","data":null}'))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        joined.set()
        got: list[str] = []
        pongs = 0
        while not got or got[-1] != "end":
            _, size = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
            size &= 0x7F
            if size == 126:
                size = int.from_bytes(await reader.readexactly(2), "big")
            payload = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
            if payload == b'{"type":"pong"}':
                pongs += 1
                continue
            got.append(json.loads(payload)["key"])
        writer.close()
    finally:
        await publisher
    assert pongs == 1
    assert got[0] == "k0", "the replay brought the start of the stream"
    assert got == keys[keys.index(got[0]) :], "every message once, in order"


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    """A Redis that also speaks TLS on a port of its own; yields it, that port and its CA."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("key", "cert", "ca")}
    cert.private_key_pem.write_to_path(files["key"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    ca.cert_pem.write_to_path(files["ca"])
    [tls_port] = free_ports(1)
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(files["cert"]),
        "--tls-key-file", str(files["key"]),
        "--tls-ca-cert-file", str(files["ca"]),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(tmp_path / "redis-tls", args=args) as redis:
        yield redis, tls_port, files["ca"]


async def test_a_rediss_broker_is_verified_against_the_given_ca(
    tls_redis: tuple[RedisServer, int, Path], nodes: Start, session: aiohttp.ClientSession
) -> None:
    _, port, ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    a = nodes("a", url, f"--broker-ca-file={ca}")
    b = nodes("b", url, f"--broker-ca-file={ca}")
    # The system's CAs don't know this one: the node starts, but can't join.
    stranger = nodes("stranger", url)
    with logs_on_failure(a, b, stranger):
        await until_up(session, a, b)
        async with tab(b, "PHID-1") as tb:
            await publish(session, a, "over-tls", "PHID-1")
            assert await keys_of(tb, 1) == ["over-tls"]
        await wait_healthy(stranger, session)
        assert await broker_up(session, stranger) == 0
        assert "unreachable at start" in stranger.log()
        assert "certificate verify failed" in stranger.log()


async def test_a_unix_socket_broker_joins_the_same_cluster_as_a_tcp_one(
    tmp_path: Path, nodes: Start, session: aiohttp.ClientSession
) -> None:
    short = Path(tempfile.mkdtemp(prefix="fa-redis-"))  # unix socket paths are short
    try:
        with RedisServer(tmp_path / "redis-unix", unixsocket=short / "redis.sock") as redis:
            a = nodes("a", redis.unix_url)
            b = nodes("b", redis.url)
            await until_up(session, a, b)
            async with tab(a, "PHID-1") as ta:
                await publish(session, b, "over-tcp", "PHID-1")
                assert await keys_of(ta, 1) == ["over-tcp"]
            assert f"broker unix://{short}/redis.sock?db=0 connected" in a.log(), a.log()
            stop(a, b)
    finally:
        shutil.rmtree(short, ignore_errors=True)


# -- what Redis refuses ---------------------------------------------------------------------


async def test_a_message_redis_refused_is_published_once_it_can_be_and_the_rest_once(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """One message of a batch fails (its stream key is unusable): the others are not redone."""
    a, b = nodes("a", redis_server.url), nodes("b", redis_server.url)
    await until_up(session, a, b)
    async with tab(b, "PHID-1", path="/~x/") as tx, tab(b, "PHID-1", path="/~y/") as ty:
        redis_server.command("SET", "fastaphlict:history:y", "not a stream")
        await publish(session, a, "x1", "PHID-1", instance="x")
        await publish(session, a, "y1", "PHID-1", instance="y")
        await publish(session, a, "x2", "PHID-1", instance="x")
        assert await keys_of(tx, 2) == ["x1", "x2"]
        # Publishing keeps failing: the node says so, and is not "up".
        await eventually(lambda: "publishing fails" in a.log(), RECOVERY, what="a down line")
        assert await broker_up(session, a) == 0
        redis_server.command("DEL", "fastaphlict:history:y")
        assert await asyncio.wait_for(keys_of(ty, 1), RECOVERY) == ["y1"]
        await until_up(session, a)
        await publish(session, a, "x3", "PHID-1", instance="x")
        assert await keys_of(tx, 1) == ["x3"], "x1 and x2 were not published twice"
        await assert_silent(ty)
    assert a.log().count("down:") == 1 and a.log().count("back after") == 1, a.log()


async def test_an_acl_user_without_client_commands_and_a_disabled_auth_leak_nothing(
    tmp_path: Path, nodes: Start, session: aiohttp.ClientSession
) -> None:
    secret = "Acl-S3cret-word"
    acl = ["--user", "fa", "on", f">{secret}", "~*", "&*", "+@all", "-client"]
    with RedisServer(tmp_path / "redis-acl", args=acl) as redis:
        a = nodes("a", f"redis://fa:{secret}@127.0.0.1:{redis.port}/0")
        await until_up(session, a)  # CLIENT SETNAME refused: only a name lost
        stop(a)
    with RedisServer(tmp_path / "redis-noauth", args=["--rename-command", "AUTH", ""]) as redis:
        b = nodes("b", f"redis://:{secret}@127.0.0.1:{redis.port}/0")
        await wait_healthy(b, session)
        assert await broker_up(session, b) == 0
        stop(b)
    assert "AUTH refused: ERR" in b.log(), b.log()
    for log in (a.log(), b.log()):
        assert secret not in log


async def test_a_long_catch_up_over_many_instances_brings_everything_once_in_order(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """More than a page of one instance, and more instances than one round trip asks for."""
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        a = nodes("a", redis_server.url)
        b = nodes("b", f"redis://127.0.0.1:{proxy.port}/0")
        await until_up(session, a, b)
        async with tab(b, "PHID-1", path="/~big/") as big, tab(b, "PHID-1", path="/~i19/") as last:
            proxy.stall()
            await until_down(session, b)
            posts = [publish(session, a, f"k{n}", "PHID-1", instance="big") for n in range(600)]
            for chunk in range(0, len(posts), 50):
                await asyncio.gather(*posts[chunk : chunk + 50])
            for n in range(20):
                await publish(session, a, f"i{n}", "PHID-1", instance=f"i{n}")
            proxy.cut()
            proxy.unstall()
            got = await asyncio.wait_for(keys_of(big, 600), RECOVERY)
            assert sorted(got, key=lambda k: int(k[1:])) == [f"k{n}" for n in range(600)]
            assert await keys_of(last, 1) == ["i19"]
            await assert_silent(big)
            await assert_silent(last)


# -- what an operator sets up: the ACL -------------------------------------------------


def readme_acl_line() -> list[str]:
    """The ``ACL SETUSER`` line for the broker's user in docs/clusters.md, as words."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "clusters.md"
    lines = [ln.strip() for ln in doc.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.startswith("ACL SETUSER ")]
    assert len(lines) == 1, f"expected one ACL SETUSER line in docs/clusters.md, got {lines}"
    return shlex.split(lines[0])


def acl_user(words: list[str]) -> tuple[str, str]:
    """The user name and password an ``ACL SETUSER`` line creates."""
    [password] = [w[1:] for w in words[3:] if w.startswith(">")]
    return words[2], password


async def test_the_readmes_acl_line_is_all_a_cluster_needs(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """The line runs verbatim, and with it alone every message crosses, both ways."""
    words = readme_acl_line()
    assert redis_server.command(*words) == "OK"
    user, password = acl_user(words)
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    a, b = nodes("a", url), nodes("b", url)
    await until_up(session, a, b)
    async with tab(a, "PHID-1") as ta, tab(b, "PHID-1") as tb:
        await publish(session, a, "from-a", "PHID-1")
        await publish(session, b, "from-b", "PHID-1")
        assert sorted(await keys_of(ta, 2)) == ["from-a", "from-b"]
        assert sorted(await keys_of(tb, 2)) == ["from-a", "from-b"]
    for node in (a, b):
        assert "may not run" not in node.log(), node.log()
        assert (
            await metric(session, node.admin_url, "fastaphlict_broker_publish_failures_total") == 0
        )
    # The history in Redis is maintained (trimmed, expiring) under this ACL too.
    assert redis_server.command("PTTL", "fastaphlict:history:default") > 0


@pytest.mark.parametrize(
    "missing",
    [
        ("+xadd", "+time"),
        # The script stops after its XADD and mark: never counted as published.
        ("+zadd",),
        ("+publish",),  # the probes too
    ],
)
async def test_a_missing_permission_is_named_in_one_line_and_granting_it_is_enough(
    redis_server: RedisServer,
    nodes: Start,
    session: aiohttp.ClientSession,
    missing: tuple[str, ...],
) -> None:
    words = [w for w in readme_acl_line() if w not in missing]
    assert redis_server.command(*words) == "OK"
    user, password = acl_user(words)
    a = nodes("a", f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0")
    b = nodes("b", redis_server.url)  # the default user: everything allowed
    await wait_healthy(a, session)
    await until_up(session, b)
    await eventually(lambda: "may not run" in a.log(), RECOVERY, what="the refusal line")
    [line] = [ln for ln in a.log().splitlines() if "may not run" in ln]
    names = ", ".join(grant[1:] for grant in missing)
    assert f"may not run {names} (" in line, line
    assert await broker_up(session, a) == 0
    async with tab(a, "PHID-1") as ta, tab(b, "PHID-1") as tb:
        await publish(session, a, "waits", "PHID-1")
        assert await keys_of(ta, 1) == ["waits"]
        await publish(session, b, "from-b", "PHID-1")  # the subscription works meanwhile
        assert await keys_of(ta, 1) == ["from-b"]
        assert await keys_of(tb, 1) == ["from-b"], "a's message did not get through"
        assert redis_server.command("ACL", "SETUSER", user, *missing) == "OK"
        assert await asyncio.wait_for(keys_of(tb, 1), RECOVERY) == ["waits"]
        await until_up(session, a)
        await assert_silent(ta)
    log = a.log()
    assert log.count("may not run") == 1, log
    assert log.count("may publish now") == 1, log
    assert password not in log


# -- what comes from elsewhere: skewed clocks, malformed entries ----------------------


async def test_a_node_whose_clock_runs_ahead_cannot_keep_messages_past_the_window(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """A message stamped an hour ahead (a skewed node) is capped at now, counted, logged."""
    b = nodes("b", redis_server.url)
    await until_up(session, b)
    ahead = (time.time() + 3600) * 1000
    body = b'{"key":"skewed","type":"notification","subscribers":["PHID-1"]}'
    async with tab(b, "PHID-1") as tb:
        # What a node an hour ahead publishes: its script call, with its clock.
        redis_server.command(
            "EVAL",
            broker_module.commands.PUBLISH_LUA,
            3,
            "fastaphlict:history:default",
            "fastaphlict:instances",
            "fastaphlict:seq:skewed-node:1",
            "default",
            "skewed-node",
            1,
            repr(ahead),
            body,
            4096,
            60000,
            "fastaphlict:0:messages",
            "1",
            600000,
        )
        assert await keys_of(tb, 1) == ["skewed"]
    assert await metric(session, b.admin_url, "fastaphlict_timestamps_capped_total") == 1
    assert "ahead of this clock: capped at now" in b.log()
    async with session.get(f"{b.admin_url}/status/") as resp:
        age = (await resp.json())["history.age"]
    assert age < 5000, f"the history's oldest entry claims an age of {age} ms"


async def test_a_malformed_stream_entry_is_skipped_and_the_catch_up_goes_on(
    redis_server: RedisServer, nodes: Start, session: aiohttp.ClientSession
) -> None:
    """Entries no node wrote (missing fields, garbage numbers) never keep a node off Redis."""
    a = nodes("a", redis_server.url)
    await until_up(session, a)
    await publish(session, a, "before", "PHID-1")
    key = "fastaphlict:history:default"
    redis_server.command("XADD", key, "*", "p", b'{"key":"no-origin"}')
    redis_server.command("XADD", key, "*", "o", "x", "s", "not-a-number", "a", "1", "p", b"{}")
    redis_server.command("ZADD", "fastaphlict:instances", time.time() * 1000, b"\xff\xfe")
    b = nodes("b", redis_server.url)  # its first catch-up reads all of it
    await until_up(session, b)
    assert await metric(session, b.admin_url, "fastaphlict_broker_malformed_total") == 3
    async with tab(b, "PHID-1") as tb:
        assert await replayed(tb) == ["before"]
        # A malformed message on the channel is skipped too; the next one arrives.
        redis_server.command("PUBLISH", "fastaphlict:0:messages", b"M\nnode\nx\n1-0\n1\n7\nd")
        await publish(session, a, "after", "PHID-1")
        assert await keys_of(tb, 1) == ["after"]
    assert await metric(session, b.admin_url, "fastaphlict_broker_malformed_total") == 4
    log = b.log()
    assert "skipped unreadable entry" in log and key in log, log
    assert await metric(session, b.admin_url, "fastaphlict_broker_reconnects_total") == 0
