"""Admin port (spec §1): routes, status codes, Phorge-shaped posts, /status/."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
from pathlib import Path

import pytest

from support import (
    PHORGE_CONTENT_TYPE,
    TIMEOUT,
    eventually,
    local_config,
    run,
    scaled,
    settings,
    spawn,
    throttles_a_minute_later,
)

PHORGE_MESSAGE = {
    "key": "6963387411591127515",
    "type": "notification",
    "subscribers": ["PHID-USER-alice", "PHID-TASK-1"],
    "uniqueID": "PHID-FEED-xyz",
    "text": "build 100% done & a=1 — ünïcødé ✓ 日本",
}


async def test_phorge_post_reaches_subscribed_browser_field_by_field() -> None:
    async with run(settings()) as srv, srv.client("/~default/") as browser:
        await browser.subscribe("PHID-USER-alice")
        resp = await srv.post(PHORGE_MESSAGE)
        assert resp.status == 200
        got = await browser.recv()
        for key, value in PHORGE_MESSAGE.items():
            assert got[key] == value, key
        assert got["touched"] == [srv.hub.fingerprint]
        assert list(got) == [*PHORGE_MESSAGE, "touched"], "key order is kept"


async def test_delivered_frame_is_compact_utf8_not_escaped() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-USER-alice")
        await srv.post(PHORGE_MESSAGE)
        raw = await browser.recv_raw()
        assert "日本" in raw and "\\u" not in raw
        assert ", " not in raw.replace("100% done & a=1", "") and '": ' not in raw


async def test_receipt_is_fingerprint_json() -> None:
    async with run(settings()) as srv:
        async with srv.session.post(
            f"{srv.admin_url}/", data=b'{"a":1}', headers={"Content-Type": PHORGE_CONTENT_TYPE}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/json")
            body = await resp.read()
        assert body == b'{"fingerprint":"%s"}' % srv.hub.fingerprint.encode()
        assert len(srv.hub.fingerprint) == 16


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b"[]", b"null", b"3", b'"text"', b"[1,2]", b"\xff\xfe"]
)
async def test_bad_body_is_400_and_nothing_is_stored(body: bytes) -> None:
    async with run(settings()) as srv:
        resp = await srv.post(None, raw=body)
        assert resp.status == 400
        status = await srv.status()
        assert status["messages.in"] == 0
        assert status["history.size"] == 0


async def test_body_over_two_mebibytes_is_413() -> None:
    async with run(settings()) as srv:
        big = json.dumps({"pad": "x" * (2 * 1024 * 1024)}).encode()
        resp = await srv.post(None, raw=big)
        assert resp.status == 413
        assert (await srv.status())["messages.in"] == 0


async def test_body_just_under_limit_is_accepted() -> None:
    async with run(settings()) as srv:
        body = json.dumps({"pad": "x" * (2 * 1024 * 1024 - 100)}).encode()
        assert len(body) < 2 * 1024 * 1024
        resp = await srv.post(None, raw=body)
        assert resp.status == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_root_are_405(method: str) -> None:
    async with run(settings()) as srv, srv.session.request(method, f"{srv.admin_url}/") as resp:
        assert resp.status == 405


@pytest.mark.parametrize("path", ["/status", "/nope", "/status/x", "/index.php"])
async def test_unknown_paths_are_404(path: str) -> None:
    async with run(settings()) as srv:
        async with srv.session.get(f"{srv.admin_url}{path}", allow_redirects=False) as resp:
            assert resp.status == 404


async def test_healthz_is_200() -> None:
    async with run(settings()) as srv, srv.session.get(f"{srv.admin_url}/healthz") as resp:
        assert resp.status == 200


async def test_head_status_is_200() -> None:
    async with run(settings()) as srv, srv.session.head(f"{srv.admin_url}/status/") as resp:
        assert resp.status == 200


async def test_status_keys_types_and_order() -> None:
    async with run(settings()) as srv:
        status = await srv.status()
        assert list(status) == [
            "instance",
            "uptime",
            "clients.active",
            "clients.total",
            "messages.in",
            "messages.out",
            "history.size",
            "history.age",
            "version",
        ]
        assert status["instance"] == "default"
        assert status["version"] == 8
        assert status["history.age"] is None, "empty history reports null, not 0"
        for key in ("uptime", "clients.active", "clients.total", "messages.in", "messages.out"):
            assert type(status[key]) is int, key


async def test_status_counts_deliveries_and_history() -> None:
    async with run(settings()) as srv, srv.client() as a, srv.client() as b:
        await a.subscribe("PHID-X")
        await b.subscribe("PHID-X", "PHID-Y")
        await srv.post({"subscribers": ["PHID-X", "PHID-Y"], "n": 1})
        assert (await a.recv())["n"] == 1
        assert (await b.recv())["n"] == 1
        await srv.post({"subscribers": ["PHID-Y"], "n": 2})
        assert (await b.recv())["n"] == 2
        await a.sync()  # replays and pongs never count as messages.out
        status = await srv.status()
        assert status["messages.in"] == 2
        assert status["messages.out"] == 3, "one message to two sockets counts 2"
        assert status["history.size"] == 2
        assert type(status["history.age"]) is int and status["history.age"] >= 0
        assert status["clients.active"] == 2
        assert status["clients.total"] == 2


async def test_clients_active_falls_on_disconnect_total_does_not() -> None:
    async with run(settings()) as srv:
        async with srv.client() as a:
            await a.sync()
            async with srv.client() as b:
                await b.sync()
                status = await srv.status()
                assert (status["clients.active"], status["clients.total"]) == (2, 2)
            await _wait_for(lambda s: s["clients.active"] == 1, srv)
        status = await _wait_for(lambda s: s["clients.active"] == 0, srv)
        assert status["clients.total"] == 2


async def test_instance_query_parameter_first_value_wins_and_is_decoded() -> None:
    async with run(settings()) as srv, srv.client("/~a-b/") as browser:
        await browser.subscribe("PHID-1")
        async with srv.session.post(
            f"{srv.admin_url}/?instance=a%2Db&instance=other",
            data=b'{"subscribers":["PHID-1"],"n":1}',
            headers={"Content-Type": PHORGE_CONTENT_TYPE},
        ) as resp:
            assert resp.status == 200
        assert (await browser.recv())["n"] == 1
        assert (await srv.status("a-b"))["history.size"] == 1
        assert (await srv.status("other"))["history.size"] == 0


async def test_empty_instance_parameter_means_default() -> None:
    async with run(settings()) as srv:
        await srv.post({"subscribers": []}, instance="")
        assert (await srv.status())["history.size"] == 1


async def test_unknown_instance_status_is_zeros() -> None:
    async with run(settings()) as srv:
        await srv.post({"subscribers": []})
        status = await srv.status("never-seen")
        assert status["instance"] == "never-seen"
        assert status["clients.active"] == 0 and status["clients.total"] == 0
        assert status["history.size"] == 0 and status["history.age"] is None


async def test_expect_100_continue_post_like_curl() -> None:
    """curl adds ``Expect: 100-continue`` to bodies over 1 KiB; the post must still land."""
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        body = json.dumps({"subscribers": ["PHID-1"], "pad": "p" * 4000}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.admin_ports[0])
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % (PHORGE_CONTENT_TYPE.encode(), len(body))
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert line.startswith(b"HTTP/1.1 100")
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.write(body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert line.startswith(b"HTTP/1.1 200")
        writer.close()
        assert (await browser.recv())["pad"] == "p" * 4000


async def _wait_for(predicate, srv):
    """Poll /status/ until ``predicate`` holds: disconnects are seen asynchronously."""
    status = {}

    async def matched() -> bool:
        nonlocal status
        status = await srv.status()
        return bool(predicate(status))

    await eventually(matched, TIMEOUT, "the status to match")
    return status


async def test_relay_failure_never_fails_the_post() -> None:
    async with run(settings()) as srv:

        class Broken:
            def relay(self, instance: str, message: dict, body: bytes) -> None:
                raise RuntimeError("boom")

        srv.hub.add_relay(Broken())
        resp = await srv.post({"subscribers": []})
        assert resp.status == 200


async def test_session_reuse_many_posts() -> None:
    """Phorge may post many messages in a burst; keep-alive connections must work."""
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        results = await asyncio.gather(
            *(srv.post({"subscribers": ["PHID-1"], "n": i}) for i in range(50))
        )
        assert all(r.status == 200 for r in results)
        got = sorted([(await browser.recv())["n"] for _ in range(50)])
        assert got == list(range(50))


async def test_non_object_json_in_form_encoding_is_not_parsed_as_form() -> None:
    async with run(settings()) as srv:
        resp = await srv.post(None, raw=b"subscribers=PHID-1&type=x")
        assert resp.status == 400


async def test_lone_surrogate_is_delivered_as_an_escape_and_the_socket_survives() -> None:
    """JSON.parse accepts ``"\\ud800"``; the frame must still be valid UTF-8."""
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        resp = await srv.post(None, raw=b'{"subscribers":["PHID-1"],"t":"a\\ud800b"}')
        assert resp.status == 200
        raw = await browser.recv_raw()
        assert '"t":"a\\ud800b"' in raw
        await browser.sync()


@pytest.mark.parametrize("body", [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}'])
async def test_non_json_constants_are_400(body: bytes) -> None:
    async with run(settings()) as srv:
        assert (await srv.post(None, raw=body)).status == 400


# -- the raw HTTP the fast path must get right ------------------------------


async def _raw_exchange(srv, payload: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.admin_ports[0])
    for piece in payload if isinstance(payload, list) else [payload]:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0)
    data = await asyncio.wait_for(reader.read(), TIMEOUT) if until_close else b""
    writer.close()
    return data


def _post_bytes(body: bytes, *, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return b"POST / %s\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        version,
        PHORGE_CONTENT_TYPE.encode(),
        len(body),
        extra,
        body,
    )


async def test_pipelined_posts_are_answered_in_order() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        one = _post_bytes(b'{"subscribers":["PHID-1"],"n":1}')
        two = _post_bytes(b'{"subscribers":["PHID-1"],"n":2}', extra=b"Connection: close\r\n")
        data = await _raw_exchange(srv, one + two)
        assert data.count(b"HTTP/1.1 200 OK") == 2
        assert (await browser.recv())["n"] == 1
        assert (await browser.recv())["n"] == 2


async def test_post_split_across_many_reads() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        raw = _post_bytes(
            '{"subscribers":["PHID-1"],"t":"日本"}'.encode(), extra=b"Connection: close\r\n"
        )
        pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
        data = await _raw_exchange(srv, pieces)
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert (await browser.recv())["t"] == "日本"


async def test_http10_post_is_answered_and_closed() -> None:
    async with run(settings()) as srv:
        data = await _raw_exchange(srv, _post_bytes(b"{}", version=b"HTTP/1.0"))
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b'"}')
        assert b"Connection: close" in data


async def test_chunked_post_is_served_by_aiohttp() -> None:
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        body = b'{"subscribers":["PHID-1"],"n":"chunked"}'
        raw = (
            b"POST /?instance=default HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        data = await _raw_exchange(srv, raw)
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert srv.hub.fingerprint.encode() in data
        assert (await browser.recv())["n"] == "chunked"


async def test_keep_alive_post_then_status_on_one_connection() -> None:
    async with run(settings()) as srv:
        raw = _post_bytes(b'{"subscribers":[]}') + (
            b"GET /status/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await _raw_exchange(srv, raw)
        first, _, rest = data.partition(b"HTTP/1.1 200 OK")[2].partition(b"HTTP/1.1 200 OK")
        assert srv.hub.fingerprint.encode() in first
        assert b'"history.size":1' in rest


async def test_bad_json_on_fast_path_keeps_the_connection() -> None:
    async with run(settings()) as srv:
        raw = _post_bytes(b"{nope") + _post_bytes(b"{}", extra=b"Connection: close\r\n")
        data = await _raw_exchange(srv, raw)
        assert data.startswith(b"HTTP/1.1 400 ")
        assert b"HTTP/1.1 200 OK" in data


async def test_oversized_content_length_is_413_without_reading_the_body() -> None:
    async with run(settings()) as srv:
        raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (3 * 1024 * 1024)
        data = await _raw_exchange(srv, raw)
        assert data.startswith(b"HTTP/1.1 413 ")


async def test_overlong_instance_parameter_is_400() -> None:
    async with run(settings()) as srv:
        assert (await srv.post({"subscribers": []}, instance="a" * 129)).status == 400
        assert (await srv.post({"subscribers": []}, instance="a" * 128)).status == 200


async def test_admin_allow_list_refuses_other_addresses() -> None:
    from fastaphlict.server import Limits

    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8",)))) as srv:
        data = await _raw_exchange(srv, _post_bytes(b"{}"))
        assert data.startswith(b"HTTP/1.1 403 ")
        assert srv.hub.stats.messages_in == 0
    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8", "127.0.0.0/8")))) as srv:
        assert (await srv.post({"subscribers": []})).status == 200
        assert (await srv.status())["messages.in"] == 1


async def test_message_published_in_the_shutdown_iteration_is_delivered_before_1001() -> None:
    from websockets.exceptions import ConnectionClosed

    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        srv.hub.publish("default", {"subscribers": ["PHID-1"], "n": "last"})
        assert srv.hub.outbox.pending == 1, "still waiting for the end of the iteration"
        await srv.server.close()
        assert (await browser.recv())["n"] == "last"
        with pytest.raises(ConnectionClosed):
            await browser.recv_raw()
        assert browser.ws.close_code == 1001


# -- JSON nested past what the parser and the serialiser handle -------------


def _deep_object(depth: int, kind: str, phid: str = "PHID-1") -> bytes:
    """A JSON object ``depth`` containers deep (itself included) naming ``phid``."""
    inner = depth - 1
    deep = b"[" * inner + b"]" * inner if kind == "list" else b'{"a":' * inner + b"1" + b"}" * inner
    return b'{"subscribers":["%s"],"n":%d,"deep":%s}' % (phid.encode(), depth, deep)


def _chunked_post_bytes(body: bytes, *, extra: bytes = b"") -> bytes:
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
        for i in range(0, len(body), 4096)
    )
    return (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
        b"%s\r\n%s0\r\n\r\n" % (PHORGE_CONTENT_TYPE.encode(), extra, chunks)
    )


@pytest.mark.parametrize("depth", [255, 1000, 1025, 5000])
@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_deep_body_is_400_and_the_pipelined_post_after_it_is_served(
    depth: int, kind: str, chunked: bool
) -> None:
    """Too deep is a 400 on both HTTP paths; the same connection serves the next request.

    Nothing of the refused body is stored, counted as accepted, delivered or relayed.
    """
    relayed: list[bytes] = []

    class Recorder:
        def relay(self, instance: str, message: dict, body: bytes) -> None:
            relayed.append(body)

    async with run(settings()) as srv, srv.client() as browser:
        srv.hub.add_relay(Recorder())
        await browser.subscribe("PHID-1")
        deep = _deep_object(depth, kind)
        after = _post_bytes(
            b'{"subscribers":["PHID-1"],"n":"after"}', extra=b"Connection: close\r\n"
        )
        first = _chunked_post_bytes(deep) if chunked else _post_bytes(deep)
        data = await _raw_exchange(srv, first + after)
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]
        assert data.count(b"HTTP/1.1 200 OK") == 1, data[:400]
        assert (await browser.recv())["n"] == "after", "the deep post reached nobody"
        status = await srv.status()
        assert status["messages.in"] == 1 and status["history.size"] == 1
        assert srv.hub.stats.posts_rejected == 1
        assert len(relayed) == 1 and b'"after"' in relayed[0]


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_max_depth_body_is_accepted_and_delivered_intact(chunked: bool) -> None:
    from fastaphlict.protocol import MAX_DEPTH

    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        body = _deep_object(MAX_DEPTH, "list")
        first = (
            _chunked_post_bytes(body, extra=b"Connection: close\r\n")
            if chunked
            else (_post_bytes(body, extra=b"Connection: close\r\n"))
        )
        data = await _raw_exchange(srv, first)
        assert data.startswith(b"HTTP/1.1 200 OK")
        got = await browser.recv_raw()
        assert got.encode() == body[:-1] + b',"touched":["%s"]}' % srv.hub.fingerprint.encode()


def _subscribers_body(count: int, n: object, first: str = "PHID-1") -> bytes:
    """A message naming ``count`` subscribers, ``first`` among them."""
    phids = [first, *(f"PHID-USER-{i:020d}" for i in range(count - 1))]
    return json.dumps({"subscribers": phids, "n": n}, separators=(",", ":")).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_a_post_over_max_subscribers_is_413_and_one_at_it_is_delivered(
    chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``--max-subscribers`` a post is refused whole: not stored, delivered or relayed.

    The body was read, so the connection stays open for the post after it,
    which holds exactly the limit and is delivered. One warning names the sender.
    """

    relayed: list[bytes] = []

    class Recorder:
        def relay(self, instance: str, message: dict, body: bytes) -> None:
            relayed.append(body)

    caplog.set_level("INFO", logger="fastaphlict")
    async with run(settings(["--max-subscribers=5"])) as srv, srv.client() as browser:
        srv.hub.add_relay(Recorder())
        await browser.subscribe("PHID-1")
        over, at = _subscribers_body(6, "over"), _subscribers_body(5, "at")
        first = _chunked_post_bytes(over) if chunked else _post_bytes(over)
        data = await _raw_exchange(srv, first + _post_bytes(at, extra=b"Connection: close\r\n"))
        assert data.startswith(b"HTTP/1.1 413 "), data[:200]
        refusal = data[: data.index(b"HTTP/1.1 200 ")]
        assert b"too many subscribers" in refusal and b"close" not in refusal.lower()
        assert data.count(b"HTTP/1.1 200 OK") == 1, data[:600]
        assert (await browser.recv())["n"] == "at", "the refused post reached nobody"
        status = await srv.status()
        assert status["messages.in"] == 1 and status["history.size"] == 1
        assert srv.hub.stats.posts_rejected == 1
        assert len(relayed) == 1 and b'"at"' in relayed[0]
    [line] = [r for r in caplog.records if r.getMessage().startswith("rejected post")]
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith("rejected post from 127.0.0.1:")
    assert line.getMessage().endswith(": 6 subscribers, over the limit of 5 (--max-subscribers)")


async def test_a_peers_relay_over_max_subscribers_is_refused_like_a_post() -> None:
    """A cluster peer's relay is a post: a node with a lower limit refuses it (413).

    The relaying node delivered it and counts one failed relay; the marker
    relayed after it reaches the refusing node's tab first, so it never will.
    """
    from fastaphlict.config import PeerConfig

    async with run(settings(["--max-subscribers=2"])) as strict:
        peer = PeerConfig("127.0.0.1", strict.server.admin_ports[0], "http")
        async with (
            run(settings(config=local_config(peers=(peer,)))) as lenient,
            lenient.client() as near,
            strict.client() as far,
        ):
            await near.subscribe("PHID-1")
            await far.subscribe("PHID-1")
            assert (await lenient.post(None, raw=_subscribers_body(3, "big"))).status == 200
            assert (await lenient.post(None, raw=_subscribers_body(2, "marker"))).status == 200
            assert [(await near.recv())["n"] for _ in range(2)] == ["big", "marker"]
            assert (await far.recv())["n"] == "marker", "the big one was refused"
            assert strict.hub.stats.posts_rejected == 1
            [relay] = lenient.server.relay.peers
            # The marker's answer may still be on its way back to the relay.
            await eventually(lambda: relay.sent == 1, what="the marker's relay counted")
            assert (relay.failed, relay.last_error) == (1, "http status 413")


@pytest.mark.parametrize(
    "subscribers",
    ["x" * 100, {str(i): "PHID-1" for i in range(100)}, None],
    ids=["string", "object", "null"],
)
async def test_only_a_subscribers_list_counts_against_the_limit(subscribers: object) -> None:
    """A string or an object reaches nobody (spec §3): it is no list of 100 subscribers."""

    async with run(settings(["--max-subscribers=5"])) as srv:
        resp = await srv.post({"subscribers": subscribers})
        assert resp.status == 200
        assert srv.hub.stats.posts_rejected == 0


async def test_the_default_max_subscribers_takes_16384_and_refuses_one_more() -> None:
    from fastaphlict.config import Limits

    assert Limits().max_subscribers == 16384
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        assert (await srv.post(None, raw=_subscribers_body(16385, "over"))).status == 413
        assert (await srv.post(None, raw=_subscribers_body(16384, "at"))).status == 200
        assert (await browser.recv())["n"] == "at"


@pytest.mark.parametrize(
    ("listen", "allow", "refused"),
    [
        ("127.0.0.1", (), ()),
        ("127.0.0.1", ("10.0.0.0/8",), ("127.0.0.1",)),
        ("127.0.0.1", ("10.0.0.0/8", "127.0.0.0/8"), ()),
        ("0.0.0.0", ("10.0.0.0/8",), ("127.0.0.1",)),
        ("::", ("10.0.0.0/8",), ("127.0.0.1", "::1")),
        ("::", ("127.0.0.1/32",), ("::1",)),
        ("::1", ("::1/128",), ()),
        ("localhost", ("10.0.0.0/8",), ("127.0.0.1", "::1")),
        ("10.1.2.3", ("10.0.0.0/8",), ()),
        ("admin.example", ("10.0.0.0/8",), ()),
    ],
)
def test_refused_loopback_names_what_the_allow_list_locks_out(
    listen: str, allow: tuple[str, ...], refused: tuple[str, ...]
) -> None:
    from fastaphlict.admin import refused_loopback
    from fastaphlict.config import Limits

    assert refused_loopback(listen, Limits(admin_allow=allow).admin_networks()) == refused


async def test_an_allow_list_refusing_loopback_warns_once_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastaphlict.server import Limits

    caplog.set_level("INFO", logger="fastaphlict")
    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8",)))) as srv:
        await _raw_exchange(srv, _post_bytes(b"{}"))
    warned = [r.getMessage() for r in caplog.records if "refuses 127.0.0.1" in r.getMessage()]
    assert warned == [
        "--admin-allow=10.0.0.0/8 refuses 127.0.0.1: health checks and a Phorge on this host"
        f" get 403 from the admin server on 127.0.0.1:{srv.server.admin_ports[0]}"
    ]
    refused = [r.getMessage() for r in caplog.records if "refused admin" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith("refused admin connection from 127.0.0.1:")
    caplog.clear()
    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8", "127.0.0.0/8")))):
        pass
    assert not [r for r in caplog.records if "refuses" in r.getMessage()]


async def test_refused_admin_connections_are_logged_within_a_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outsider hammering the admin port gets 403 every time, and 20 log lines a minute."""
    from fastaphlict.server import Limits

    caplog.set_level("INFO", logger="fastaphlict")
    async with run(settings(limits=Limits(admin_allow=("10.0.0.0/8",)))) as srv:
        for _ in range(30):
            answer = await _raw_exchange(srv, _post_bytes(b"{}"))
            assert answer.startswith(b"HTTP/1.1 403 ")
    refused = [r for r in caplog.records if "refused admin connection" in r.getMessage()]
    assert len(refused) == 20


async def test_a_rejected_post_names_its_sender_as_host_and_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="fastaphlict.admin")
    async with run(settings()) as srv:
        answer = await _raw_exchange(srv, _post_bytes(b"[1]", extra=b"Connection: close\r\n"))
        assert answer.startswith(b"HTTP/1.1 400 ")
    [line] = [r.getMessage() for r in caplog.records if "rejected post" in r.getMessage()]
    assert line.startswith("rejected post from 127.0.0.1:") and "(" not in line, line


# -- refusals within a log budget -------------------------------------------


_BAD_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"

#: How to get each kind of refusal on the admin port, and the line it logs.
_ADMIN_REFUSALS = {
    "rejected post": (_post_bytes(b"[1]", extra=b"Connection: close\r\n"), b"400", "rejected post"),
    "rejected post (aiohttp)": (
        _chunked_post_bytes(b"not json", extra=b"Connection: close\r\n"),
        b"400",
        "rejected post",
    ),
    "post too large": (_post_bytes(b"{}" + b" " * 2000), b"413", "rejected post over"),
    "post too large (aiohttp)": (
        _chunked_post_bytes(b"{}" + b" " * 2000, extra=b"Connection: close\r\n"),
        b"413",
        "rejected post over",
    ),
    "bad request": (_BAD_HEAD, b"400", "rejected request"),
    "rejected post (too many subscribers)": (
        _post_bytes(_subscribers_body(3, 1), extra=b"Connection: close\r\n"),
        b"413",
        "rejected post from",
    ),
    "rejected post (too many subscribers, aiohttp)": (
        _chunked_post_bytes(_subscribers_body(3, 1), extra=b"Connection: close\r\n"),
        b"413",
        "rejected post from",
    ),
    "bad request (head the fast path left to aiohttp)": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\n{}",
        b"400",
        "rejected request",
    ),
    "bad request (body aiohttp can't decode)": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd",
        b"400",
        "rejected request",
    ),
}


@pytest.mark.parametrize("case", list(_ADMIN_REFUSALS))
async def test_admin_refusals_are_logged_within_a_budget_then_summed_up(
    case: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client repeating a bad request gets its answer every time and 20 lines a minute.

    After the minute, the next line comes with the count of those left out.
    A malformed head is aiohttp's to answer: one short line, no traceback.
    """

    request, status, line = _ADMIN_REFUSALS[case]
    kind = case.split(" (")[0]
    caplog.set_level("INFO", logger="fastaphlict")
    async with run(settings(["--max-body-size=1024", "--max-subscribers=2"])) as srv:
        for _ in range(25):
            answer = await _raw_exchange(srv, request)
            assert answer.split(b" ", 2)[1] == status, answer[:200]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(line)]
        assert len(lines) == 20, lines
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        throttles_a_minute_later(monkeypatch)
        await _raw_exchange(srv, request)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppressed")]
    assert summary and summary[0].startswith(f"suppressed 5 similar line(s) ({kind})"), summary
    assert srv.hub.stats.posts_rejected == (0 if kind == "bad request" else 26)


# -- a 413 reaches a client still sending its body (lingering close) --------


def _post_then_read(port: int, body: bytes, chunked: bool) -> tuple[int, bool] | str:
    """Python's ``http.client``: the whole body goes out, then the answer is read.

    Returns the status and whether the answer said ``Connection: close``, or
    the error that took the answer's place.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        if chunked:  # aiohttp serves chunked bodies, not the fast path
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            conn.request("POST", "/", body=pieces, encode_chunked=True)
        else:
            conn.request("POST", "/", body=body, headers={"Content-Type": PHORGE_CONTENT_TYPE})
        response = conn.getresponse()
        response.read()
        return response.status, response.will_close
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_a_client_still_sending_an_oversized_body_reads_the_413(chunked: bool) -> None:
    """No ``Expect: 100-continue``: the 413 comes while the body is still on its way.

    The rest of the body is read and dropped before the connection closes,
    so the client's last bytes don't meet a closed socket (a reset that
    takes the unread answer with it).
    """
    async with run(settings()) as srv:
        port = srv.server.admin_ports[0]
        body = b"x" * (3 * 1024 * 1024)
        answers = [await asyncio.to_thread(_post_then_read, port, body, chunked) for _ in range(40)]
        assert answers == [(413, True)] * 40
        assert srv.hub.stats.posts_rejected == 40
        assert (await srv.post({"subscribers": []})).status == 200


def _send_then_read_to_the_end(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_the_413_closes_the_connection_once_the_body_is_read(chunked: bool) -> None:
    body = b"x" * (3 * 1024 * 1024)
    request = _chunked_post_bytes(body) if chunked else _post_bytes(body)
    async with run(settings()) as srv:
        answer = await asyncio.to_thread(
            _send_then_read_to_the_end, srv.server.admin_ports[0], request
        )
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"\r\nConnection: close" in head
    assert text == b"request body too large\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_a_client_trickling_a_huge_body_is_cut_off_after_the_413(
    chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lingering is bounded in time: a client can't hold the connection by trickling."""
    from fastaphlict import admin

    monkeypatch.setattr(admin, "LINGER_TIME", 0.5)
    async with run(settings(["--max-body-size=1024"])) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.admin_ports[0])
        if chunked:
            writer.write(_chunked_post_bytes(b"x" * 2048)[: -len(b"0\r\n\r\n")])
            piece = b"1\r\nx\r\n"
        else:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**40)
            piece = b"x"
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert line.startswith(b"HTTP/1.1 413 "), line
        loop = asyncio.get_running_loop()
        cut_off = loop.time() + scaled(0.5 + 1.0)
        # The rest of the answer; the fast path half-closes once it is sent.
        rest = asyncio.ensure_future(reader.read())
        # Closed for good: a trickled byte meets the closed socket and is reset.
        while not writer.transport.is_closing():
            assert loop.time() < cut_off, "still lingering"
            writer.write(piece)
            await asyncio.sleep(0.02)
        await asyncio.wait([rest], timeout=TIMEOUT)
        assert rest.done()
        rest.exception()  # the reset may have come before the end of the stream
        writer.close()
        # Meanwhile, and after, the port serves everyone else.
        assert (await srv.post({"subscribers": []})).status == 200


def _send_until_refused(port: int, head: bytes, piece: bytes, most: int) -> int | None:
    """Send ``head`` then ``piece`` until ``most`` bytes; how many went out before an error."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        sent = 0
        try:
            while sent < most:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            return sent
        return None


@pytest.mark.parametrize("chunked", [False, True], ids=["fast-path", "aiohttp"])
async def test_lingering_drops_a_bounded_number_of_bytes(
    chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that declares a huge body and sends it fast is cut off after LINGER_BYTES.

    Whatever the kernel buffers on both sides (tens of MiB at most on
    loopback) is far below what the client tries to send.
    """
    from fastaphlict import admin

    monkeypatch.setattr(admin, "LINGER_BYTES", 1024 * 1024)
    monkeypatch.setattr(admin, "LINGER_TIME", 600.0)  # only the byte bound may end it
    data = b"x" * 65536
    if chunked:
        head = _chunked_post_bytes(b"x" * 2048)[: -len(b"0\r\n\r\n")]
        piece = b"%x\r\n%s\r\n" % (len(data), data)
    else:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**40
        piece = data
    most = 256 * 1024 * 1024
    async with run(settings(["--max-body-size=1024"])) as srv:
        port = srv.server.admin_ports[0]
        sent = await asyncio.to_thread(_send_until_refused, port, head, piece, most)
        assert sent is not None, f"the server read all {most} bytes"
        assert srv.hub.stats.posts_rejected == 1


# -- strict heads, resets during the hand-off, HTTP/1.0 (issue 16) ----------


#: Heads the old fast path answered 200 (and delivered) that HTTP refuses.
_SMUGGLING_HEADS = [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length\x0b: 2\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n : 5\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\n\x01: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\n: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding\x00: chunked\r\nContent-Length: 2\r\n\r\n{}",
]


@pytest.mark.parametrize("request_bytes", _SMUGGLING_HEADS)
async def test_a_head_http_refuses_is_400_and_delivers_nothing(request_bytes: bytes) -> None:
    """aiohttp answers what the fast path does not fully understand (RFC 9112 §5)."""
    async with run(settings()) as srv:
        answer = await _raw_exchange(srv, request_bytes)
        assert answer.split(b" ", 2)[1] == b"400", answer[:200]
        assert srv.hub.stats.posts_rejected == 0 and (await srv.status())["messages.in"] == 0


async def test_a_head_ending_in_bare_lfs_is_answered_without_waiting() -> None:
    """aiohttp refuses it at once; the fast path must not sit waiting for CRLF CRLF."""
    async with run(settings()) as srv:
        answer = await _raw_exchange(srv, b"POST / HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}")
        assert answer.split(b" ", 2)[1] == b"400", answer[:200]


async def test_http10_expect_100_continue_gets_no_interim_answer() -> None:
    """RFC 9110 §10.1.1: an HTTP/1.0 client gets no 100; its body is read as it comes."""
    async with run(settings()) as srv:
        body = b'{"k":1}'
        head = (
            b"POST / HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        answer = await _raw_exchange(srv, [head, body])
        assert answer.startswith(b"HTTP/1.1 200 ") and b" 100 " not in answer, answer


async def test_a_connection_value_containing_close_keeps_the_connection() -> None:
    """``Connection: xclose`` is not ``close``: the second post is answered on the same socket."""
    async with run(settings()) as srv:
        first = _post_bytes(b'{"n":1}', extra=b"Connection: xclose\r\n")
        second = _post_bytes(b'{"n":2}', extra=b"Connection: close\r\n")
        answer = await _raw_exchange(srv, first + second)
        assert answer.count(b"HTTP/1.1 200 ") == 2, answer


async def test_a_reset_during_the_hand_off_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``[POST /][GET /status/]`` in one write, then a reset: 300 times, no traceback.

    The answer to the post fails on the reset; the transport is closing from
    then on, and handing it to aiohttp made aiohttp's task fail an assertion
    ("Task exception was never retrieved") once connection_lost came.
    """
    import gc
    import struct

    caplog.set_level("INFO")
    loop = asyncio.get_running_loop()
    request = _post_bytes(b"{}") + b"GET /status/ HTTP/1.1\r\nHost: x\r\n\r\n"
    linger = struct.pack("ii", 1, 0)
    async with run(settings()) as srv:
        port = srv.server.admin_ports[0]
        for _ in range(300):
            with socket.socket() as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await loop.sock_sendall(sock, request)
        # The server still serves, and has seen every reset by now.
        await srv.status()
        for _ in range(3):
            gc.collect()  # aiohttp's failed task is logged when collected
            await asyncio.sleep(0.01)
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, caplog.text[:3000]


# -- a client that pipelines and never reads (write back-pressure) ----------


_PIPELINED = _post_bytes(b"{}") * 1000


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _stuffed(port: int, most: int) -> tuple[socket.socket, int]:
    """Pipeline ``POST /`` without reading until the sends stall (or ``most`` bytes went)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(scaled(2.0))
    sent = 0
    try:
        while sent < most:
            sock.sendall(_PIPELINED)
            sent += len(_PIPELINED)
    except TimeoutError:
        pass
    return sock, sent


def test_a_pipeliner_that_never_reads_stalls_instead_of_growing_the_server(
    tmp_path: Path,
) -> None:
    """The server stops reading while its answers wait, as aiohttp does (issue 16).

    Without that, 30 MiB of small posts sent by a client that never reads
    grew the server by 50 MiB of buffered answers (90 MiB: +165 MiB). With
    it, the client's sends stall once the kernel's buffers are full.
    """
    most = 30 * 2**20
    with spawn(tmp_path / "server.log") as server:
        server.wait_ready()
        before = _rss_mib(server.pid)
        sock, sent = _stuffed(server.admin_port, most)
        with sock:
            grown = _rss_mib(server.pid) - before
            assert sent < most, f"the server read all {sent} bytes, and grew by {grown:.1f} MiB"
            assert grown < 16, f"{grown:.1f} MiB more after {sent} bytes"


async def test_a_pipeliner_that_never_reads_is_closed_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Activity is what the client reads: answers piling up unread don't keep it open.

    Answers wait in the write buffer, so closing would wait for good: the
    connection is aborted instead.
    """
    import select

    from fastaphlict import admin

    monkeypatch.setattr(admin, "KEEPALIVE_TIMEOUT", scaled(1.0))
    loop = asyncio.get_running_loop()
    async with run(settings()) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setblocking(False)
        with sock:
            await loop.sock_connect(sock, ("127.0.0.1", srv.server.admin_ports[0]))
            poller = select.poll()
            poller.register(sock, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
            sent = 0
            with contextlib.suppress(TimeoutError, ConnectionError):
                while sent < 30 * 2**20:
                    await asyncio.wait_for(loop.sock_sendall(sock, _PIPELINED), scaled(0.5))
                    sent += len(_PIPELINED)
            assert sent < 30 * 2**20, "the server never stopped reading"
            await eventually(lambda: bool(poller.poll(0)), what="the server closing the connection")
            assert srv.hub.stats.posts_rejected == 0


async def test_a_client_leaving_mid_body_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp logs a traceback for each request whose body ends early; here it is a debug line."""
    caplog.set_level("DEBUG", logger="fastaphlict")
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    async with run(settings()) as srv:
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.admin_ports[0])
            writer.write(head)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
        await srv.status()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert len([r for r in caplog.records if "ended early" in r.getMessage()]) == 30


class _Backlogged:
    """A transport whose client takes nothing: every answer stays in its buffer."""

    def __init__(self) -> None:
        self.buffered = 0
        self.closed = self.aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


async def test_answers_left_unread_are_no_activity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client posting now and then but taking no answer is aborted after the idle timeout.

    Under the write buffer's high-water mark nothing pauses it: only counting
    activity by what the client takes ends it. A close would wait for the
    unread answers for good, so it is an abort.
    """
    from fastaphlict import admin
    from fastaphlict.hub import Hub

    monkeypatch.setattr(admin, "KEEPALIVE_TIMEOUT", scaled(0.5))
    loop = asyncio.get_running_loop()
    wire = _Backlogged()
    conn = admin.AdminProtocol(Hub("FPFPFPFPFPFPFPFP"), lambda: None, set())  # type: ignore[arg-type, return-value]
    conn.connection_made(wire)  # type: ignore[arg-type]
    deadline = loop.time() + TIMEOUT
    while not wire.aborted:
        assert loop.time() < deadline, "posts whose answers nobody reads kept it alive"
        conn.data_received(_post_bytes(b"{}"))
        await asyncio.sleep(0.05)
    assert not wire.closed and wire.buffered > 0
    conn.connection_lost(None)
