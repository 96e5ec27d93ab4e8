"""The benchmark floors are correct servers, or their figures would flatter fastaphlict.

The minimal server (``fastaphlict.bench.minimal``) must deliver what the
protocol says to whom it says, and nothing to anyone else; the bare protocol
(``fastaphlict.bench.bare``) must complete the handshake and answer pings,
which is all a storm's tab waits for. Both run as real processes here.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect

from docs_support import labelled, runnable
from fastaphlict.bench.minimal import frame, unmask
from support import TIMEOUT, Browser, ServerProcess, free_ports, post, spawn_floor

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def minimal(tmp_path: Path) -> Iterator[ServerProcess]:
    with spawn_floor(tmp_path / "minimal.log", "minimal") as server:
        yield server


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[ServerProcess]:
    with spawn_floor(tmp_path / "bare.log", "bare") as server:
        yield server


def test_frames_and_unmasking_follow_rfc_6455() -> None:
    assert frame(b"hi") == b"\x81\x02hi"
    assert frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert frame(b"x" * 70000)[:2] == b"\x81\x7f"
    assert frame(b"", 0xA) == b"\x8a\x00"
    mask = b"\x37\xfa\x21\x3d"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(b"Hello"))
    assert unmask(masked, mask) == b"Hello"


async def test_the_minimal_server_delivers_to_subscribers_only(minimal: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        connect(f"{minimal.client_url}/", open_timeout=TIMEOUT) as a,
        connect(f"{minimal.client_url}/", open_timeout=TIMEOUT) as b,
    ):
        alice, bob = Browser(a), Browser(b)
        await alice.subscribe("PHID-USER-alice", "PHID-TASK-1")
        await bob.subscribe("PHID-USER-bob")
        await alice.sync()
        await bob.sync()
        text = "100% done & a=1, naïve"
        message = {"key": "1", "type": "notification", "subscribers": ["PHID-TASK-1"], "t": text}
        resp = await post(session, minimal.admin_url, message)
        assert resp.status == 200
        receipt = json.loads(await resp.text())
        got = await alice.recv()
        assert got["key"] == "1" and got["t"] == text
        assert got["touched"] == [receipt["fingerprint"]], "the protocol's loopback mark"
        # Bob names none of its PHIDs: the next message, his, must come first.
        await post(session, minimal.admin_url, {"key": "2", "subscribers": ["PHID-USER-bob"]})
        assert (await bob.recv())["key"] == "2"
        await alice.send("unsubscribe", ["PHID-TASK-1"])
        await alice.sync()
        await post(session, minimal.admin_url, {"key": "3", "subscribers": ["PHID-TASK-1"]})
        await post(session, minimal.admin_url, {"key": "4", "subscribers": ["PHID-USER-alice"]})
        assert (await alice.recv())["key"] == "4", "nothing after an unsubscribe"


async def test_the_minimal_server_reads_pipelined_posts(minimal: ServerProcess) -> None:
    async with connect(f"{minimal.client_url}/", open_timeout=TIMEOUT) as ws:
        tab = Browser(ws)
        await tab.subscribe("PHID-1")
        await tab.sync()
        reader, writer = await asyncio.open_connection("127.0.0.1", minimal.admin_port)
        requests = b""
        for key in ("a", "b", "c"):
            body = json.dumps({"key": key, "subscribers": ["PHID-1"]}).encode()
            requests += (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        writer.write(requests[:50])
        await writer.drain()
        writer.write(requests[50:])
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200")
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
        writer.close()
        assert [(await tab.recv())["key"] for _ in range(3)] == ["a", "b", "c"]


async def test_the_minimal_server_answers_plain_http_as_aphlict_does(
    minimal: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{minimal.client_port}/") as resp:
            assert resp.status == 501
            assert await resp.read() == b"HTTP/501 Use Websockets\n"
        resp = await post(session, minimal.admin_url, None, raw=b"[1, 2]")
        assert resp.status == 400


async def test_the_bare_protocol_answers_pings_and_drops_the_rest(bare: ServerProcess) -> None:
    async with connect(f"{bare.client_url}/", open_timeout=TIMEOUT) as ws:
        tab = Browser(ws)
        await tab.subscribe("PHID-1")
        await ws.send(json.dumps({"command": "replay", "data": {"age": 60000}}))
        await tab.sync()  # the pong is the first frame: subscribe and replay sent nothing


async def test_the_documented_floor_commands_start_correct_floors(tmp_path: Path) -> None:
    """docs/benchmarks.md's two commands, as written, on free ports instead of 23280/23281."""
    minimal_command, bare_command = labelled("floors").commands
    for kind, command in (("minimal", minimal_command), ("bare", bare_command)):
        assert f"fastaphlict.bench.{kind}" in command
        client, admin = free_ports(2)
        text = runnable(command).replace("23280", str(client)).replace("23281", str(admin))
        argv = shlex.split(text)
        with spawn_floor(tmp_path / f"{kind}.log", kind, (client, admin), argv) as floor:
            async with connect(f"{floor.client_url}/", open_timeout=TIMEOUT) as ws:
                tab = Browser(ws)
                await tab.subscribe("PHID-DOCS")
                if kind == "minimal":
                    async with aiohttp.ClientSession() as session:
                        message = {"key": "docs", "subscribers": ["PHID-DOCS"]}
                        assert (await post(session, floor.admin_url, message)).status == 200
                    assert (await tab.recv())["key"] == "docs"
