"""A restart that loses nothing: systemd's sockets and a state directory (issue 10).

The test plays systemd: it holds both listening sockets and hands them to
each server process as fds 3 and 4 (``support.activated``), so while one
process stops and the next starts, connections and posts wait in the listen
backlog instead of being refused. Tabs behave like Phorge's ``JX.Aphlict``:
when their socket closes they reconnect, subscribe again, ``replay`` the
last 60 s and drop what they already had, by ``key``. Posts come steadily,
each on a new HTTP connection, as PHP's curl makes them. Mid-stream the
server gets SIGTERM and a new one starts on the same sockets and the same
state directory: every post must get its 200, and every tab must end with
every message addressed to it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support import (
    PHORGE_CONTENT_TYPE,
    TIMEOUT,
    activated,
    cancel_and_wait,
    eventually,
    listening,
    scaled,
    stop,
)

pytestmark = pytest.mark.timeout(120)

TABS = 20
USERS = 5
#: Posts a second, and how long they go on before and after the SIGTERM.
RATE = 50.0
BEFORE = 1.0
AFTER = 1.5


class Tab:
    """A JX.Aphlict-like tab: reconnects, re-subscribes, replays, de-duplicates by key."""

    def __init__(self, url: str, phid: str) -> None:
        self.url = url
        self.phid = phid
        self.keys: set[str] = set()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with connect(self.url, open_timeout=TIMEOUT) as ws:
                    self.connections += 1
                    await ws.send(json.dumps({"command": "subscribe", "data": [self.phid]}))
                    if self.connections > 1:  # JX.Aphlict replays after a reconnect
                        await ws.send(json.dumps({"command": "replay", "data": {"age": 60000}}))
                    async for frame in ws:
                        key = json.loads(frame).get("key")
                        if key is not None:
                            self.keys.add(key)  # a replayed duplicate changes nothing
            except (ConnectionClosed, OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)  # JX.Aphlict waits a moment before reconnecting

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)


async def _post(admin: socket.socket, body: bytes) -> tuple[int, float]:
    """One post on a new connection, as PHP's curl makes it: its status and how long it took."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*admin.getsockname()), TIMEOUT)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (PHORGE_CONTENT_TYPE.encode(), len(body), body)
        )
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), time.monotonic() - started


async def test_a_restart_on_systemds_sockets_loses_nothing(tmp_path: Path) -> None:
    client, admin = listening(), listening()
    args = (f"--state-dir={tmp_path / 'state'}",)
    servers = [activated(tmp_path / "first.log", [client, admin], args=args)]
    url = f"ws://127.0.0.1:{client.getsockname()[1]}/"
    tabs = [Tab(url, f"PHID-USER-{i % USERS}") for i in range(TABS)]
    sent: dict[str, str] = {}
    delays: list[float] = []
    try:
        for tab in tabs:
            tab.start()
        # Until every tab is subscribed, a warm-up message now and then.
        deadline = time.monotonic() + scaled(10)
        warm = 0
        while not all(any(k.startswith("warm") for k in t.keys) for t in tabs):
            assert time.monotonic() < deadline, "tabs never subscribed"
            body = {"key": f"warm{warm}", "subscribers": [f"PHID-USER-{i}" for i in range(USERS)]}
            assert (await _post(admin, json.dumps(body).encode()))[0] == 200
            warm += 1
            await asyncio.sleep(0.05)

        async def post_steadily(seconds: float) -> None:
            n = 0
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                key, phid = f"m{n}", f"PHID-USER-{n % USERS}"
                body = json.dumps({"key": key, "type": "notification", "subscribers": [phid]})
                status, took = await _post(admin, body.encode())
                assert status == 200, f"post {key} answered {status}"
                sent[key] = phid
                delays.append(took)
                n += 1
                await asyncio.sleep(1 / RATE)

        poster = asyncio.ensure_future(post_steadily(BEFORE + AFTER))
        await asyncio.sleep(BEFORE)
        stop(servers[0])  # SIGTERM, and wait for it to exit
        assert servers[0].proc.returncode == 0, servers[0].log()
        servers.append(activated(tmp_path / "second.log", [client, admin], args=args))
        await poster

        for tab in tabs:
            owed = {key for key, phid in sent.items() if phid == tab.phid}
            await eventually(
                lambda t=tab, o=owed: o <= t.keys, scaled(10), what=f"a tab of {tab.phid} got all"
            )
        assert all(t.connections >= 2 for t in tabs), "every tab lived through the restart"
        assert "state: loaded" in servers[1].log()
        print(
            f"{len(delays)} posts, every one 200; the longest took {max(delays) * 1000:.0f} ms"
            f" (median {sorted(delays)[len(delays) // 2] * 1000:.1f} ms)"
        )
    finally:
        for tab in tabs:
            await tab.stop()
        stop(*servers)
        client.close()
        admin.close()
