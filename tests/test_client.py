"""Client port (spec §2, §3): plain HTTP, instances, commands, bad frames, replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable

import pytest
from websockets.exceptions import ConnectionClosed

import fastaphlict.hub as hub_module
from fastaphlict.protocol import HISTORY_TTL_MS, PONG
from support import (
    TIMEOUT,
    Browser,
    assert_silent,
    eventually,
    run,
    scaled,
    settings,
    stalled_websocket,
    throttles_a_minute_later,
    upgrade_request,
)


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return data


# -- plain HTTP on the client port ----------------------------------------


@pytest.mark.parametrize("path", ["/", "/~acme/", "/index.php?x=1"])
async def test_plain_get_gets_exact_501(path: str) -> None:
    async with run(settings()) as srv:
        response = await raw_http(
            srv.server.client_ports[0], b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
        )
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 501 ")
        assert body == b"HTTP/501 Use Websockets\n"
        assert len(body) == 24


async def test_healthz_on_client_port_is_200() -> None:
    async with run(settings()) as srv:
        response = await raw_http(
            srv.server.client_ports[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert response.startswith(b"HTTP/1.1 200 ")


async def test_any_origin_is_accepted() -> None:
    from websockets.asyncio.client import connect

    async with run(settings()) as srv:
        async with connect(srv.client_url("/~acme/"), origin="https://evil.example") as ws:
            browser = Browser(ws)
            await browser.sync()


# -- instance from the path -----------------------------------------------


async def test_two_instances_are_isolated_for_delivery_history_replay_and_status() -> None:
    async with run(settings()) as srv:
        async with srv.client("/~acme/?instance=acme") as acme, srv.client("/~beta/") as beta:
            await acme.subscribe("PHID-1")
            await beta.subscribe("PHID-1")
            await srv.post({"subscribers": ["PHID-1"], "n": "acme"}, instance="acme")
            assert (await acme.recv())["n"] == "acme"
            await srv.post({"subscribers": ["PHID-1"], "n": "beta"}, instance="beta")
            assert (await beta.recv())["n"] == "beta", "beta never saw acme's message"
            await assert_silent(acme)

            await acme.send("replay", {"age": 60000})
            assert (await acme.recv())["n"] == "acme"
            await assert_silent(acme)

            acme_status, beta_status = await srv.status("acme"), await srv.status("beta")
            assert acme_status["history.size"] == 1 and beta_status["history.size"] == 1
            assert acme_status["clients.active"] == 1 and beta_status["clients.active"] == 1
            assert (await srv.status())["clients.active"] == 0


# -- delivery -------------------------------------------------------------


async def test_unsubscribed_client_gets_nothing() -> None:
    async with run(settings()) as srv, srv.client() as alice, srv.client() as bob:
        await alice.subscribe("PHID-USER-alice")
        await bob.subscribe("PHID-USER-bob")
        await srv.post({"subscribers": ["PHID-USER-alice"], "n": 1})
        assert (await alice.recv())["n"] == 1
        # Proof by a second message that must arrive first.
        await srv.post({"subscribers": ["PHID-USER-bob"], "n": 2})
        assert (await bob.recv())["n"] == 2


@pytest.mark.parametrize(
    "message",
    [
        {"n": 1, "subscribers": []},
        {"n": 1},
        {"n": 1, "subscribers": "PHID-1"},
        {"n": 1, "subscribers": {"PHID-1": True}},
        {"n": 1, "subscribers": None},
        {"n": 1, "subscribers": [1, None, ["PHID-1"]]},
    ],
)
async def test_empty_missing_or_non_list_subscribers_reach_nobody(message: dict) -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1", "P", "H", "I", "D", "-", "1")

        class Recorder:
            bodies: list[bytes] = []

            def relay(self, instance: str, message: dict, body: bytes) -> None:
                self.bodies.append(body)

        recorder = Recorder()
        srv.hub.add_relay(recorder)
        assert (await srv.post(message)).status == 200
        await srv.post({"subscribers": ["PHID-1"], "n": 2})
        assert (await browser.recv())["n"] == 2, "the first message reached nobody"
        assert (await srv.status())["history.size"] == 2, "still stored"
        assert len(recorder.bodies) == 2, "still relayed"
        assert json.loads(recorder.bodies[0])["n"] == 1


async def test_each_socket_gets_a_message_once_however_many_phids_match() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-A", "PHID-B", "PHID-C")
        await srv.post({"subscribers": ["PHID-A", "PHID-B", "PHID-C", "PHID-A"], "n": 1})
        assert (await browser.recv())["n"] == 1
        await assert_silent(browser)
        assert (await srv.status())["messages.out"] == 1


async def test_only_string_subscriber_entries_match() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("1", "PHID-1")
        await srv.post({"subscribers": [1, {"PHID-1": 1}], "n": 1})
        await srv.post({"subscribers": [1, "PHID-1"], "n": 2})
        assert (await browser.recv())["n"] == 2


async def test_existing_touched_is_extended_in_place() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        await srv.post({"touched": ["otherfingerprint"], "subscribers": ["PHID-1"]})
        got = await browser.recv()
        assert list(got) == ["touched", "subscribers"]
        assert got["touched"] == ["otherfingerprint", srv.hub.fingerprint]


async def test_loopback_is_answered_but_not_stored_or_delivered() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        resp = await srv.post({"touched": [srv.hub.fingerprint], "subscribers": ["PHID-1"]})
        assert resp.status == 200
        status = await srv.status()
        assert status["history.size"] == 0 and status["messages.in"] == 0
        await assert_silent(browser)


# -- commands -------------------------------------------------------------


async def test_ping_answers_exactly_pong() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        for data in (None, 1, "x", {"a": 1}):
            await browser.send("ping", data)
            assert await browser.recv_raw() == '{"type":"pong"}'
        await browser.send_raw('{"command":"ping"}')
        assert await browser.recv_raw() == '{"type":"pong"}'


async def test_binary_frames_are_commands_too() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.send_raw(b'{"command":"subscribe","data":["PHID-1"]}')
        await browser.send_raw(b'{"command":"ping","data":null}')
        assert await browser.recv_raw() == '{"type":"pong"}'
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        assert (await browser.recv())["n"] == 1


async def test_unsubscribe_stops_delivery() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1", "PHID-2")
        await browser.send("unsubscribe", ["PHID-1", "PHID-never"])
        await browser.sync()
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        await srv.post({"subscribers": ["PHID-2"], "n": 2})
        assert (await browser.recv())["n"] == 2


BAD_FRAMES = [
    "not json",
    "{",
    "[]",
    "null",
    "42",
    '"subscribe"',
    '{"command":"unknown","data":["PHID-1"]}',
    '{"command":null,"data":["PHID-1"]}',
    '{"command":["subscribe"],"data":["PHID-1"]}',
    '{"data":["PHID-1"]}',
    '{"command":"subscribe"}',
    '{"command":"subscribe","data":null}',
    '{"command":"subscribe","data":"PHID-1"}',
    '{"command":"subscribe","data":{"PHID-1":true}}',
    '{"command":"subscribe","data":[1,null,true,{"a":1},["PHID-1"]]}',
    '{"command":"unsubscribe","data":"PHID-X"}',
    '{"command":"unsubscribe","data":null}',
    '{"command":"replay","data":"60000"}',
    '{"command":"replay","data":[60000]}',
    "",
    "\u00e9\u00e8",
    '{"command":"subscribe","data":["' + "x" * 60000 + '"]}',
    "[" * 10000 + "]" * 10000,
    '{"command":"subscribe","data":[' + "1" * 400 + "]}",
]


@pytest.mark.parametrize("frame", BAD_FRAMES, ids=range(len(BAD_FRAMES)))
async def test_bad_frame_is_ignored_and_socket_keeps_working(frame: str) -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-X")
        await browser.send_raw(frame)
        await browser.sync()
        # No error frame was sent, and a string was not split into characters.
        assert srv.hub.instance("default").channel.phid_count == 1
        await srv.post({"subscribers": ["PHID-1", "P"], "n": 1})
        await srv.post({"subscribers": ["PHID-X"], "n": 2})
        assert (await browser.recv())["n"] == 2


async def test_invalid_utf8_text_frame_is_ignored() -> None:
    async with run(settings()) as srv, srv.client() as other:
        await other.subscribe("PHID-1")
        async with srv.client() as browser:
            await browser.ws.send(b"\xff\xfe", text=True)
            await browser.sync()  # ignored like any non-JSON frame
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        assert (await other.recv())["n"] == 1


async def test_commands_are_processed_in_order() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        for i in range(200):
            await browser.send("subscribe", [f"PHID-{i}"])
            await browser.send("unsubscribe", [f"PHID-{i - 1}"])
        await browser.sync()
        sub = srv.hub.instance("default").channel.subscribers()[0]
        assert sub.phids == {"PHID-199"}


# -- replay ---------------------------------------------------------------


async def _post_numbered(srv, phids_by_n: dict[int, list[str]]) -> None:
    for n, phids in phids_by_n.items():
        assert (await srv.post({"subscribers": phids, "n": n})).status == 200


async def test_replay_sends_subscribed_history_oldest_first() -> None:
    async with run(settings()) as srv:
        await _post_numbered(srv, {1: ["PHID-A"], 2: ["PHID-B"], 3: ["PHID-A", "PHID-C"], 4: []})
        async with srv.client() as browser:
            await browser.subscribe("PHID-A", "PHID-C")
            await browser.send("replay", {"age": 60000})
            assert (await browser.recv())["n"] == 1
            assert (await browser.recv())["n"] == 3
            await assert_silent(browser)
        assert (await srv.status())["messages.out"] == 0, "replays are not counted"


@pytest.mark.parametrize("data", [None, {}, {"age": 0}, {"age": "x"}, {"age": None}, {"age": True}])
async def test_replay_default_age(data: object) -> None:
    async with run(settings()) as srv:
        await _post_numbered(srv, {1: ["PHID-A"]})
        async with srv.client() as browser:
            await browser.subscribe("PHID-A")
            await browser.send("replay", data)
            assert (await browser.recv())["n"] == 1


async def test_replay_with_data_missing() -> None:
    async with run(settings()) as srv:
        await _post_numbered(srv, {1: ["PHID-A"]})
        async with srv.client() as browser:
            await browser.subscribe("PHID-A")
            await browser.send_raw('{"command":"replay"}')
            assert (await browser.recv())["n"] == 1


async def test_replay_negative_age_sends_nothing() -> None:
    async with run(settings()) as srv:
        await _post_numbered(srv, {1: ["PHID-A"]})
        async with srv.client() as browser:
            await browser.subscribe("PHID-A")
            await browser.send("replay", {"age": -1})
            await assert_silent(browser)


async def test_replay_age_window(monkeypatch: pytest.MonkeyPatch) -> None:
    async with run(settings()) as srv:
        now = hub_module.now_ms()
        monkeypatch.setattr(hub_module, "now_ms", lambda: now - 5000)
        await _post_numbered(srv, {1: ["PHID-A"]})  # posted 5 s ago
        monkeypatch.undo()
        await _post_numbered(srv, {2: ["PHID-A"]})
        async with srv.client() as browser:
            await browser.subscribe("PHID-A")
            await browser.send("replay", {"age": 1000})
            assert (await browser.recv())["n"] == 2
            await assert_silent(browser)
            await browser.send("replay", {"age": 10000})
            assert (await browser.recv())["n"] == 1
            assert (await browser.recv())["n"] == 2


async def test_history_is_purged_by_age_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    async with run(settings()) as srv:
        old = time.time() * 1000 - HISTORY_TTL_MS - 1
        monkeypatch.setattr(hub_module, "now_ms", lambda: old)
        await _post_numbered(srv, {1: ["PHID-A"]})
        monkeypatch.undo()
        status = await srv.status()
        assert status["history.size"] == 0 and status["history.age"] is None


async def test_history_is_capped_at_4096() -> None:
    async with run(settings()) as srv:
        hub = srv.hub
        for n in range(4100):
            hub.publish("default", {"subscribers": [], "n": n})
        assert (await srv.status())["history.size"] == 4096
        async with srv.client() as browser:
            await browser.subscribe("PHID-A")
            hub.publish("default", {"subscribers": ["PHID-A"], "n": "last"})
            assert (await browser.recv())["n"] == "last"


async def test_debug_traces_every_command_and_delivery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastaphlict")
    async with run(settings(["--debug"])) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        await browser.send_raw("garbage")
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        await browser.recv()
    text = caplog.text
    assert "command subscribe" in text and "command ping" in text
    assert "ignored frame" in text
    assert "publish instance=default to 1 socket(s)" in text
    assert "deliver to 127.0.0.1:" in text, "one address format, no tuples"
    assert "('127.0.0.1'" not in text


async def test_without_debug_nothing_is_traced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastaphlict")
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        await browser.recv()
    assert "command subscribe" not in caplog.text
    assert "deliver to" not in caplog.text


# -- limits -----------------------------------------------------------------


async def test_frame_over_the_limit_closes_with_1009() -> None:
    from websockets.exceptions import ConnectionClosed

    async with run(settings()) as srv, srv.client() as browser:
        await browser.send_raw('{"command":"ping","pad":"' + "x" * (64 * 1024) + '"}')
        with pytest.raises(ConnectionClosed):
            await browser.recv_raw()
        assert browser.ws.close_code == 1009


async def test_fragmented_message_over_the_limit_closes_with_1009() -> None:
    from websockets.exceptions import ConnectionClosed

    async with run(settings()) as srv, srv.client() as browser:
        await browser.ws.send(["x" * 40000, "y" * 40000])  # two fragments, each under the limit
        with pytest.raises(ConnectionClosed):
            await browser.recv_raw()
        assert browser.ws.close_code == 1009


async def test_fragmented_command_is_reassembled() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.ws.send(['{"command":"subscribe",', '"data":["PHID-1"]}'])
        await browser.sync()
        await srv.post({"subscribers": ["PHID-1"], "n": 1})
        assert (await browser.recv())["n"] == 1


async def test_too_many_subscriptions_close_with_1008() -> None:
    from websockets.exceptions import ConnectionClosed

    async with run(settings(["--max-subscriptions=10"])) as srv, srv.client() as browser:
        await browser.subscribe(*(f"PHID-{i}" for i in range(10)))
        await browser.send("subscribe", ["PHID-1", "PHID-2"])  # already held: fine
        await browser.sync()
        await browser.send("subscribe", ["PHID-new"])
        with pytest.raises(ConnectionClosed):
            await browser.recv_raw()
        assert browser.ws.close_code == 1008


async def test_overlong_phids_are_skipped() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("P" * 513, "PHID-1", "é" * 257)
        sub = srv.hub.instance("default").channel.subscribers()[0]
        assert sub.phids == {"PHID-1"}


async def test_overlong_instance_name_is_refused() -> None:
    from websockets.exceptions import InvalidStatus

    async with run(settings()) as srv:
        with pytest.raises(InvalidStatus) as info:
            async with srv.client("/~" + "a" * 129 + "/"):
                pass
        assert info.value.response.status_code == 400
        async with srv.client("/~" + "a" * 128 + "/") as browser:
            await browser.sync()


async def test_connections_past_the_cap_get_503() -> None:
    from websockets.exceptions import InvalidStatus

    async with run(settings(["--max-connections=2"])) as srv:
        async with srv.client() as one, srv.client() as two:
            await one.sync()
            await two.sync()
            with pytest.raises(InvalidStatus) as info:
                async with srv.client():
                    pass
            assert info.value.response.status_code == 503
            assert info.value.response.headers["Retry-After"] == "5"
        async with srv.client() as three:  # room again once they left
            await three.sync()


async def test_origin_allow_list() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from fastaphlict.server import Limits

    limits = Limits(allowed_origins=("https://phorge.example.com",))
    async with run(settings(limits=limits)) as srv:
        async with connect(srv.client_url(), origin="https://phorge.example.com") as ws:
            await Browser(ws).sync()
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.client_url(), origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403


@pytest.mark.timeout(30)
async def test_a_client_that_stops_answering_pings_is_closed() -> None:
    """Half-open TCP: the socket is closed within two ping intervals."""

    async with run(settings(["--ping-interval=0.2"])) as srv:
        stalled = await stalled_websocket(srv.server.client_ports[0])
        try:
            async with srv.client() as alive:  # answers pings (websockets does)
                await alive.subscribe("PHID-1")
                started = time.monotonic()
                await eventually(
                    lambda: srv.hub.clients_active <= 1, scaled(5), "the silent socket closed"
                )
                assert time.monotonic() - started < scaled(1.0), "closed within about two intervals"
                assert srv.hub.stats.dead_disconnects == 1
                await srv.post({"subscribers": ["PHID-1"], "n": 1})
                assert (await alive.recv())["n"] == 1
        finally:
            stalled.close()


async def test_handshake_timeout_drops_silent_connections() -> None:

    async with run(settings(["--handshake-timeout=0.3"])) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.client_ports[0])
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"", "closed, nothing sent"
        assert time.monotonic() - started < scaled(2.0)
        writer.close()


# -- frames the protocol forbids, and JSON nested too deep -------------------


def _client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 §5.2), whatever it means; ``rsv``: bits 0x70."""
    import os
    import struct

    key = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _raw_socket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer


async def _server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """Server frames up to and including its close frame (short frames only)."""
    frames = []
    while True:
        head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        payload = await asyncio.wait_for(reader.readexactly(head[1] & 0x7F), TIMEOUT)
        frames.append((head[0] & 0x0F, payload))
        if head[0] & 0x0F == 0x8:
            return frames


PING_COMMAND = b'{"command":"ping","data":null}'


@pytest.mark.parametrize(
    "frames",
    [
        [_client_frame(0x1, b'{"command":', fin=False), _client_frame(0x1, PING_COMMAND)],
        [_client_frame(0x1, b'{"command":', fin=False), _client_frame(0x2, PING_COMMAND)],
        [_client_frame(0x2, b'{"command":', fin=False), _client_frame(0x1, b"{", fin=False)],
        [_client_frame(0x0, PING_COMMAND)],
        [_client_frame(0x0, b'{"command":', fin=False), _client_frame(0x0, b'"ping"}')],
    ],
    ids=[
        "text-inside-fragments",
        "binary-inside-fragments",
        "new-fragmented-message-inside-fragments",
        "continuation-alone",
        "continuations-without-a-start",
    ],
)
async def test_fragmentation_errors_close_with_1002(
    frames: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6455 §5.4, as ws does it: fail the connection with 1002, run nothing of it."""
    caplog.set_level(logging.INFO, logger="fastaphlict.client")
    async with run(settings()) as srv:
        reader, writer = await _raw_socket(srv.server.client_ports[0])
        try:
            writer.write(b"".join(frames) + _client_frame(0x1, PING_COMMAND))
            got = await _server_frames(reader)
        finally:
            writer.close()
        assert got == [(0x8, b"\x03\xea" + b"protocol error")], "no pong, just the 1002 close"
        assert srv.hub.stats.frames_rejected == 1
        lines = [r for r in caplog.records if "protocol error" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]


#: Frames whose last one carries the given RSV bits, by what that frame is.
_RESERVED: dict[str, Callable[[int], list[bytes]]] = {
    "text": lambda rsv: [_client_frame(0x1, PING_COMMAND, rsv=rsv)],
    "binary": lambda rsv: [_client_frame(0x2, PING_COMMAND, rsv=rsv)],
    "continuation": lambda rsv: [
        _client_frame(0x1, b'{"command":', fin=False),
        _client_frame(0x0, b'"ping","data":null}', rsv=rsv),
    ],
    "ping": lambda rsv: [_client_frame(0x9, b"hi", rsv=rsv)],
    "pong": lambda rsv: [_client_frame(0xA, b"hi", rsv=rsv)],
    "close": lambda rsv: [_client_frame(0x8, b"\x03\xe8", rsv=rsv)],
}


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70], ids=["rsv1", "rsv2", "rsv3", "all"])
@pytest.mark.parametrize("kind", sorted(_RESERVED))
async def test_reserved_bits_without_an_extension_close_with_1002(kind: str, rsv: int) -> None:
    """RFC 6455 §5.2: no extension is negotiated, so any set RSV bit fails the connection.

    The bad frame is a ping command (or a ping, or a close): nothing of it
    runs, no pong comes back, not even for the well-formed ping command that
    follows, and a close is not echoed but answered with 1002.
    """
    frames = _RESERVED[kind](rsv)
    async with run(settings()) as srv:
        reader, writer = await _raw_socket(srv.server.client_ports[0])
        try:
            writer.write(b"".join(frames) + _client_frame(0x1, PING_COMMAND))
            got = await _server_frames(reader)
        finally:
            writer.close()
        assert got == [(0x8, b"\x03\xea" + b"protocol error")], "no pong, just the 1002 close"
        assert srv.hub.stats.frames_rejected == 1


async def test_pings_are_answered_with_their_payload_by_the_listener() -> None:
    # Auto-pong is off (it would answer before the reserved bits are checked).
    async with run(settings()) as srv:
        reader, writer = await _raw_socket(srv.server.client_ports[0])
        try:
            writer.write(_client_frame(0x9, b"") + _client_frame(0x9, b"x" * 125))
            first = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
            second = await asyncio.wait_for(reader.readexactly(2 + 125), TIMEOUT)
        finally:
            writer.close()
        assert first == b"\x8a\x00"
        assert second == b"\x8a\x7d" + b"x" * 125


async def test_fragments_around_control_frames_are_still_one_message() -> None:
    async with run(settings()) as srv:
        reader, writer = await _raw_socket(srv.server.client_ports[0])
        try:
            writer.write(
                _client_frame(0x1, b'{"command":', fin=False)
                + _client_frame(0x9, b"hi")
                + _client_frame(0x0, b'"ping","data":null}')
            )
            first = await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
            second = await asyncio.wait_for(reader.readexactly(2 + len(PONG)), TIMEOUT)
        finally:
            writer.close()
        assert first == b"\x8a\x02hi", "picows answers the ping"
        assert second == b"\x81\x0f" + PONG
        assert srv.hub.stats.frames_rejected == 0


def _deep_ping(depth: int, kind: str) -> str:
    """A ping command ``depth`` containers deep, the command object included."""
    inner = depth - 1
    data = "[" * inner + "]" * inner if kind == "list" else '{"a":' * inner + "1" + "}" * inner
    return '{"command":"ping","data":' + data + "}"


@pytest.mark.parametrize("depth", [253, 254, 255, 256, 500, 1000, 1023, 1024, 1025, 5000])
@pytest.mark.parametrize("kind", ["list", "object"])
async def test_frame_nested_past_max_depth_is_ignored_like_the_admin_port_refuses_it(
    depth: int, kind: str
) -> None:
    """Up to MAX_DEPTH a deep ping is a ping; past it the frame is ignored, the socket lives."""
    from fastaphlict.protocol import MAX_DEPTH

    async with run(settings()) as srv, srv.client() as browser:
        await browser.send_raw(_deep_ping(depth, kind))
        if depth <= MAX_DEPTH:
            assert await browser.recv_raw() == PONG.decode()
        await assert_silent(browser)  # the next frame is the pong of this ping
        assert srv.hub.stats.frames_rejected == (0 if depth <= MAX_DEPTH else 1)


async def test_frame_100000_deep_is_over_the_size_limit_and_closes_with_1009() -> None:
    from websockets.exceptions import ConnectionClosed

    async with run(settings()) as srv, srv.client() as browser:
        await browser.send_raw(_deep_ping(100_000, "list"))
        with pytest.raises(ConnectionClosed):
            await browser.recv_raw()
        assert browser.ws.close_code == 1009


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_client_frame(0x1, b"x" * 2000), 1009),
        (_client_frame(0x3, b"x"), 1002),
    ],
    ids=["oversized", "bad-opcode"],
)
async def test_a_protocol_error_is_one_info_line_with_address_and_reason(
    frame: bytes, code: int, caplog: pytest.LogCaptureFixture
) -> None:

    caplog.set_level(logging.INFO, logger="fastaphlict")
    async with run(settings(["--max-frame-size=1024"])) as srv:
        reader, writer = await _raw_socket(srv.server.client_ports[0])
        try:
            writer.write(frame + _client_frame(0x1, PING_COMMAND))
            got = await _server_frames(reader)
        finally:
            writer.close()
        assert got[-1][0] == 0x8 and int.from_bytes(got[-1][1][:2], "big") == code
        reason = got[-1][1][2:].decode()
        await eventually(
            lambda: srv.hub.stats.frames_rejected != 0, TIMEOUT, "the close was counted"
        )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "fastaphlict.client"]
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"closed 127\.0\.0\.1:\d+: protocol error: .+ \(close {code}\)", lines[0])
    assert reason in lines[0], "the reason the client was sent"
    assert srv.hub.stats.frames_rejected == 1


async def test_a_frame_that_is_not_utf8_is_named_so(caplog: pytest.LogCaptureFixture) -> None:
    # Ignored like any bad frame, as Aphlict's ws did not; but not called "not JSON".
    caplog.set_level(logging.INFO, logger="fastaphlict")
    async with run(settings()) as srv, srv.client() as browser:
        await browser.ws.send(b'{"command":"\xff\xfe"}')
        await browser.ws.send(PING_COMMAND.decode())
        assert await asyncio.wait_for(browser.ws.recv(), TIMEOUT) == PONG.decode()
    lines = [r.getMessage() for r in caplog.records if "ignored frame" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("ignored frame (not UTF-8) from 127.0.0.1:")


def test_throttle_allows_a_burst_then_counts_and_reports_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastaphlict.ratelimit import Throttle

    caplog.set_level(logging.INFO, logger="fastaphlict")
    throttle = Throttle("ignored frame", limit=3, window=scaled(0.2))
    assert [throttle.allow() for _ in range(5)] == [True, True, True, False, False]
    assert not caplog.records
    time.sleep(scaled(0.2))
    assert throttle.allow()
    [record] = caplog.records
    assert record.getMessage().startswith(
        "suppressed 2 similar line(s) (ignored frame) in the last"
    )


async def test_rejected_frames_from_many_sockets_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastaphlict.client")
    async with run(settings()) as srv:
        for _ in range(30):  # a hostile client, one new socket per bad frame
            async with srv.client() as browser:
                await browser.send_raw("not json")
                await browser.send("ping")
                await asyncio.wait_for(browser.ws.recv(), TIMEOUT)
        assert srv.hub.stats.frames_rejected == 30, "every one counted"
    lines = [r for r in caplog.records if "ignored frame" in r.getMessage()]
    assert len(lines) == 20


async def test_debug_close_line_says_who_closed_with_code_reason_and_lifetime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastaphlict.client")
    async with run(settings(["--debug"])) as srv:
        async with srv.client() as browser:
            await browser.ws.close(4000, "tab closed")
        await eventually(
            lambda: any("connection closed" in r.getMessage() for r in caplog.records),
            TIMEOUT,
            "the connection closed line",
        )
    [line] = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    pattern = (
        r"connection closed: instance=default peer=127\.0\.0\.1:\d+ closed by the client:"
        r" code 4000 reason 'tab closed', after \d+\.\ds"
    )
    assert re.fullmatch(pattern, line), line


def test_picows_lines_use_the_one_address_format(caplog: pytest.LogCaptureFixture) -> None:
    from fastaphlict.client import PicowsLog

    caplog.set_level(logging.DEBUG, logger="picows.server")
    picows_log = PicowsLog(logging.getLogger("picows.server"), {})
    picows_log.info("New connection accepted: %s <- %s", ("127.0.0.1", 22280), ("::1", 5, 0, 0))
    picows_log.error("WS parser error: %s", "frame too big")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.INFO, "New connection accepted: 127.0.0.1:22280 <- [::1]:5"),
        (logging.DEBUG, "WS parser error: frame too big"),
    ]


async def test_sockets_closed_for_too_many_subscriptions_are_logged_within_a_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:

    caplog.set_level(logging.INFO, logger="fastaphlict.client")
    async with run(settings(["--max-subscriptions=2"])) as srv:
        for _ in range(25):  # a hostile client, one new socket per refusal
            async with srv.client() as browser:
                await browser.send("subscribe", ["A", "B", "C"])
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(browser.ws.recv(), TIMEOUT)
                assert browser.ws.close_code == 1008
        assert srv.hub.stats.frames_rejected == 25, "every one counted"
    lines = [r for r in caplog.records if "subscriptions from" in r.getMessage()]
    assert len(lines) == 20


#: How to get each refusal of an upgrade: path, extra header, limits, status, line.
_UPGRADE_REFUSALS = {
    "origin": (
        "/",
        b"Origin: https://evil.example\r\n",
        {"allowed_origins": ("https://phorge.example.com",)},
        b"403",
        "refused origin",
    ),
    "instance name": ("/~" + "a" * 129 + "/", b"", {}, b"400", "refused instance name"),
    "connection cap": ("/", b"", {"max_connections": 1}, b"503", "refused connection"),
}


@pytest.mark.parametrize("kind", list(_UPGRADE_REFUSALS))
async def test_refused_upgrades_are_logged_within_a_budget_then_summed_up(
    kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page retrying a refused socket in a loop gets its answer every time, 20 lines a minute."""
    from fastaphlict.server import Limits

    path, header, limits, status, line = _UPGRADE_REFUSALS[kind]
    request = upgrade_request(path).replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n")
    caplog.set_level(logging.INFO, logger="fastaphlict.client")
    async with run(settings(limits=Limits(**limits))) as srv:
        port = srv.server.client_ports[0]
        async with srv.client() if kind == "connection cap" else contextlib.nullcontext():
            for _ in range(25):
                answer = await raw_http(port, request)
                assert answer.split(b" ", 2)[1] == status, answer
            lines = [r for r in caplog.records if r.getMessage().startswith(line)]
            assert len(lines) == 20
            throttles_a_minute_later(monkeypatch)
            await raw_http(port, request)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppressed")]
    assert summary and summary[0].startswith(f"suppressed 5 similar line(s) ({kind})"), summary


@pytest.mark.timeout(60)
async def test_slow_clients_are_logged_within_a_budget(caplog: pytest.LogCaptureFixture) -> None:
    """A tab can make itself slow at will (replays it never reads): 20 lines a minute."""

    caplog.set_level(logging.INFO, logger="fastaphlict.client")
    async with run(settings(["--max-buffered=1"])) as srv:
        port = srv.server.client_ports[0]
        stalled = [await stalled_websocket(port) for _ in range(25)]
        try:
            async with srv.client() as browser:  # subscribed after them: all are in
                await browser.subscribe("PHID-1")
                pad = "x" * 60_000
                for n in range(100):
                    await srv.post({"subscribers": ["PHID-1"], "n": n, "pad": pad})
                    assert (await browser.recv())["n"] == n
                    if srv.hub.stats.slow_disconnects == 25:
                        break
                assert srv.hub.stats.slow_disconnects == 25, "every one counted"
        finally:
            for sock in stalled:
                sock.close()
    lines = [r for r in caplog.records if r.getMessage().startswith("closing slow client")]
    assert len(lines) == 20
