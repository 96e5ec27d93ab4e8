"""Relay to cluster peers (spec §5), against real sockets on 127.0.0.1.

Fake peers are small aiohttp servers that record each request byte for byte;
the hung peer is a raw asyncio server that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from fastaphlict.peers import FINGERPRINT_ALPHABET, PeerRelay, new_fingerprint
from support import TIMEOUT, blackholed_port, eventually, scaled

try:
    from fastaphlict.config import PeerConfig
except ImportError:  # config.py not written yet; the relay only reads these three fields

    @dataclass(frozen=True)
    class PeerConfig:  # type: ignore[no-redef]
        host: str
        port: int
        protocol: str


LOGGER = "fastaphlict.peers"
WAIT = TIMEOUT  # ceiling for any single wait; tests normally finish far sooner


@dataclass
class Received:
    method: str
    path: str
    query_string: str
    content_type: str | None
    content_length: str | None
    body: bytes


@dataclass
class FakePeer:
    """An aiohttp server standing in for another fastaphlict/Aphlict node."""

    port: int = 0
    fingerprint: str = "PeerFingerprint2"
    status: int = 200
    reply: bytes | None = None  # overrides the normal fingerprint receipt
    requests: list[Received] = field(default_factory=list)

    @property
    def config(self) -> PeerConfig:
        return PeerConfig(host="127.0.0.1", port=self.port, protocol="http")

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.requests]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(
                method=request.method,
                path=request.path,
                # Raw, as sent: request.query_string would percent-decode it.
                query_string=request.raw_path.partition("?")[2],
                content_type=request.headers.get("Content-Type"),
                content_length=request.headers.get("Content-Length"),
                body=await request.read(),
            )
        )
        reply = self.reply
        if reply is None:
            reply = json.dumps({"fingerprint": self.fingerprint}).encode()
        return web.Response(status=self.status, body=reply, content_type="application/json")


@dataclass
class HungPeer:
    """Accepts connections, reads whatever arrives, never replies."""

    port: int = 0
    connections: int = 0

    @property
    def config(self) -> PeerConfig:
        return PeerConfig(host="127.0.0.1", port=self.port, protocol="http")


def within(awaitable: Awaitable[Any], timeout: float = WAIT) -> Awaitable[Any]:
    return asyncio.wait_for(awaitable, timeout)


def message(n: int, touched: list[str] | None = None) -> bytes:
    return json.dumps({"key": str(n), "subscribers": [], "touched": touched or ["self"]}).encode()


@pytest.fixture
async def start_peer() -> AsyncIterator[Callable[..., Awaitable[FakePeer]]]:
    runners: list[web.AppRunner] = []

    async def start(**kwargs: Any) -> FakePeer:
        peer = FakePeer(**kwargs)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", peer.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await within(runner.setup())
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await within(site.start())
        peer.port = runner.addresses[0][1]
        return peer

    yield start
    for runner in runners:
        await within(runner.cleanup())


@pytest.fixture
async def hung_peer() -> AsyncIterator[HungPeer]:
    peer = HungPeer()
    transports: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer.connections += 1
            transports.append(transport)

    server = await within(asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0))
    peer.port = server.sockets[0].getsockname()[1]
    yield peer
    server.close()
    for transport in transports:
        transport.close()
    await within(server.wait_closed())


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on: bound once to learn it, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def relays() -> AsyncIterator[Callable[..., Awaitable[PeerRelay]]]:
    """Builds started relays and always closes them, so no worker outlives its test."""
    made: list[PeerRelay] = []

    async def make(configs: list[Any], *, start: bool = True, **kwargs: Any) -> PeerRelay:
        relay = PeerRelay(configs, **kwargs)
        made.append(relay)
        if start:
            await within(relay.start())
        return relay

    yield make
    for relay in made:
        await within(relay.close(timeout=0.5))


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- fingerprint ---------------------------------------------------------------


def test_fingerprint_is_16_chars_from_alphabet() -> None:
    assert len(FINGERPRINT_ALPHABET) == 55
    fingerprint = new_fingerprint()
    assert len(fingerprint) == 16
    assert set(fingerprint) <= set(FINGERPRINT_ALPHABET)


def test_fingerprints_are_random() -> None:
    assert len({new_fingerprint() for _ in range(100)}) == 100


# -- the request -----------------------------------------------------------------


async def test_relay_posts_exact_bytes_with_byte_content_length(start_peer, relays) -> None:
    fake = await start_peer()
    relay = await relays([fake.config])
    text = '{"key":"1","text":"100% done & a=1 — héllo ✓","touched":["abc"]}'
    body = text.encode("utf-8")
    assert len(body) != len(text)  # the regression Node has: length in characters

    relay.relay("a b/&c", {"touched": ["abc"]}, body)
    await eventually(lambda: len(fake.requests) == 1)

    got = fake.requests[0]
    assert got.method == "POST"
    assert got.path == "/"
    assert got.query_string == "instance=a%20b%2F%26c"
    assert got.content_type == "application/json"
    assert got.content_length == str(len(body))
    assert got.body == body


def test_peer_url_brackets_ipv6_and_keeps_protocol() -> None:
    relay = PeerRelay(
        [
            PeerConfig(host="::1", port=22281, protocol="https"),
            PeerConfig(host="peer1.example.com", port=22281, protocol="http"),
        ]
    )
    assert [p.url for p in relay.peers] == [
        "https://[::1]:22281/",
        "http://peer1.example.com:22281/",
    ]


# -- fingerprints learned from receipts --------------------------------------------


async def test_fingerprint_learned_from_200_receipt(start_peer, relays) -> None:
    fake = await start_peer(fingerprint="LearnedFromPeerX")
    relay = await relays([fake.config])
    peer = relay.peers[0]
    assert peer.fingerprint is None

    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: peer.sent == 1)

    assert peer.fingerprint == "LearnedFromPeerX"
    assert peer.failed == 0
    assert peer.last_error is None


async def test_error_status_teaches_nothing(start_peer, relays) -> None:
    fake = await start_peer(status=500)
    relay = await relays([fake.config])
    peer = relay.peers[0]

    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: peer.failed == 1)

    assert peer.fingerprint is None
    assert peer.sent == 0
    assert peer.last_error is not None and "500" in peer.last_error


async def test_garbage_receipt_teaches_nothing_and_counts_failure(start_peer, relays) -> None:
    fake = await start_peer(reply=b"<html>not json</html>")
    relay = await relays([fake.config])
    peer = relay.peers[0]

    relay.relay("default", {"touched": ["self"]}, message(1))
    relay.relay("default", {"touched": ["self"]}, message(2))
    await eventually(lambda: peer.failed == 2)

    assert peer.fingerprint is None
    assert peer.sent == 0
    assert len(fake.requests) == 2  # unknown fingerprint: still tried every time


async def test_peer_whose_fingerprint_is_touched_is_skipped(start_peer, relays) -> None:
    fake = await start_peer(fingerprint="AlreadyTouchedMe")
    relay = await relays([fake.config])
    peer = relay.peers[0]
    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: peer.fingerprint == "AlreadyTouchedMe")

    relay.relay("default", {"touched": ["self", "AlreadyTouchedMe"]}, message(2))
    assert peer.queued == 0  # decided synchronously, nothing enqueued
    relay.relay("default", {"touched": ["self", "SomeoneElse12345"]}, message(3))
    await eventually(lambda: len(fake.requests) == 2)

    assert fake.bodies == [message(1), message(3)]


async def test_known_peers_are_told_of_each_other_so_a_mesh_delivers_once(
    start_peer, relays
) -> None:
    """Each copy lists the other known targets, so they don't relay to each other."""
    b = await start_peer(fingerprint="BBBBBBBBBBBBBBBB")
    c = await start_peer(fingerprint="CCCCCCCCCCCCCCCC")
    relay = await relays([b.config, c.config])
    relay.relay("default", {"touched": ["AAAAAAAAAAAAAAAA"]}, message(1))
    await eventually(lambda: all(p.fingerprint for p in relay.peers))
    assert b.bodies == [message(1)] and c.bodies == [message(1)], "unknown peers: body as is"

    msg = {"key": "2", "subscribers": ["PHID-1"], "touched": ["AAAAAAAAAAAAAAAA"]}
    relay.relay("default", msg, json.dumps(msg).encode())
    await eventually(lambda: len(b.bodies) == 2 and len(c.bodies) == 2)
    to_b, to_c = json.loads(b.bodies[1]), json.loads(c.bodies[1])
    assert to_b == {**msg, "touched": ["AAAAAAAAAAAAAAAA", "CCCCCCCCCCCCCCCC"]}
    assert to_c == {**msg, "touched": ["AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB"]}
    assert msg["touched"] == ["AAAAAAAAAAAAAAAA"], "the published message is not modified"


async def test_unknown_fingerprint_is_always_tried(start_peer, relays) -> None:
    fake = await start_peer(fingerprint="InTouchedAlready")
    relay = await relays([fake.config])

    # The peer's fingerprint is in touched, but we haven't learned it yet.
    relay.relay("default", {"touched": ["InTouchedAlready"]}, message(1))
    await eventually(lambda: len(fake.requests) == 1)

    assert relay.peers[0].fingerprint == "InTouchedAlready"


async def test_order_preserved_across_50_messages(start_peer, relays) -> None:
    fake = await start_peer()
    relay = await relays([fake.config])
    expected = [message(n) for n in range(50)]

    for body in expected:
        relay.relay("default", {"touched": ["self"]}, body)
    await eventually(lambda: len(fake.requests) == 50)

    assert fake.bodies == expected
    assert relay.peers[0].sent == 50


# -- failing peers don't hurt anyone else -----------------------------------------------


async def test_down_peer_delays_neither_caller_nor_healthy_peer(
    start_peer, relays, dead_port
) -> None:
    healthy = await start_peer()
    down = PeerConfig(host="127.0.0.1", port=dead_port, protocol="http")
    relay = await relays([down, healthy.config])
    dead_peer, good_peer = relay.peers
    expected = [message(n) for n in range(100)]

    started = time.perf_counter()
    for body in expected:
        relay.relay("default", {"touched": ["self"]}, body)
    elapsed = time.perf_counter() - started
    assert elapsed < scaled(0.5), f"relay() took {elapsed:.3f}s for 100 messages"

    await eventually(lambda: len(healthy.requests) == 100)
    assert healthy.bodies == expected
    await eventually(lambda: dead_peer.failed == 100)
    assert dead_peer.sent == 0
    assert dead_peer.last_error is not None
    assert good_peer.failed == 0


async def test_hung_peer_times_out_and_healthy_peer_gets_everything(
    start_peer, hung_peer, relays
) -> None:
    healthy = await start_peer()
    relay = await relays([hung_peer.config, healthy.config], timeout=0.3)
    hung, _ = relay.peers
    expected = [message(n) for n in range(5)]

    for body in expected:
        relay.relay("default", {"touched": ["self"]}, body)
    await eventually(lambda: len(healthy.requests) == 5, timeout=scaled(1.0))
    assert healthy.bodies == expected

    await eventually(lambda: hung.failed >= 1, timeout=scaled(2.0))
    assert hung.sent == 0
    assert hung.last_error is not None and "timed out" in hung.last_error


async def test_full_queue_drops_oldest_and_logs_once(start_peer, relays, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake = await start_peer()
    # Not started yet: nothing drains, so the queue fills deterministically.
    relay = await relays([fake.config], start=False, queue_limit=3)
    peer = relay.peers[0]
    bodies = [message(n) for n in range(10)]

    for body in bodies:
        relay.relay("default", {"touched": ["self"]}, body)

    assert peer.queued == 3
    assert peer.dropped == 7
    assert len(warnings(caplog)) == 1

    await within(relay.start())
    await eventually(lambda: len(fake.requests) == 3)
    assert fake.bodies == bodies[-3:]
    recovered = [r for r in caplog.records if r.name == LOGGER and "recovered" in r.getMessage()]
    assert len(recovered) == 1


async def test_repeated_failures_log_one_warning(relays, dead_port, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    relay = await relays([PeerConfig(host="127.0.0.1", port=dead_port, protocol="http")])
    peer = relay.peers[0]

    for n in range(20):
        relay.relay("default", {"touched": ["self"]}, message(n))
    await eventually(lambda: peer.failed == 20)

    assert len(warnings(caplog)) == 1


async def test_recovery_logged_once_after_failure_streak(start_peer, relays, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake = await start_peer(status=503)
    relay = await relays([fake.config])
    peer = relay.peers[0]

    for n in range(5):
        relay.relay("default", {"touched": ["self"]}, message(n))
    await eventually(lambda: peer.failed == 5)
    fake.status = 200
    for n in range(5, 10):
        relay.relay("default", {"touched": ["self"]}, message(n))
    await eventually(lambda: peer.sent == 5)

    assert len(warnings(caplog)) == 1
    recovered = [r for r in caplog.records if r.name == LOGGER and "recovered" in r.getMessage()]
    assert len(recovered) == 1
    assert recovered[0].levelno == logging.INFO


# -- shutdown -------------------------------------------------------------------------


async def test_close_drains_queued_messages(start_peer) -> None:
    fake = await start_peer()
    relay = PeerRelay([fake.config])
    await within(relay.start())
    expected = [message(n) for n in range(10)]
    for body in expected:
        relay.relay("default", {"touched": ["self"]}, body)

    await within(relay.close(timeout=scaled(2.0)))

    assert fake.bodies == expected


async def test_close_is_idempotent_and_bounded_with_hung_peer(hung_peer) -> None:
    relay = PeerRelay([hung_peer.config], timeout=5.0)
    await within(relay.start())
    relay.relay("default", {"touched": ["self"]}, message(1))
    relay.relay("default", {"touched": ["self"]}, message(2))
    await eventually(lambda: hung_peer.connections == 1)

    started = time.perf_counter()
    await within(relay.close(timeout=0.3))
    assert time.perf_counter() - started < scaled(1.5)

    started = time.perf_counter()
    await within(relay.close(timeout=0.3))
    assert time.perf_counter() - started < scaled(0.1)

    relay.relay("default", {"touched": ["self"]}, message(3))  # after close: ignored, never raises
    assert relay.peers[0].queued == 0


async def test_close_without_start() -> None:
    relay = PeerRelay([PeerConfig(host="127.0.0.1", port=1, protocol="http")])
    relay.relay("default", {"touched": ["self"]}, message(1))
    await within(relay.close(timeout=0.1))
    await within(relay.close(timeout=0.1))


async def test_close_does_not_wait_for_a_peer_still_connecting() -> None:
    # A firewalled peer: the connect hangs; draining it could only time out.
    with blackholed_port() as port:
        relay = PeerRelay([PeerConfig("127.0.0.1", port, "http")], timeout=5.0)
        await within(relay.start())
        relay.relay("default", {"touched": ["self"]}, message(1))
        await eventually(lambda: relay.peers[0]._connecting)
        started = time.perf_counter()
        await within(relay.close(timeout=2.0))
        assert time.perf_counter() - started < scaled(0.2)


async def test_close_does_not_wait_for_a_failing_peer(dead_port: int) -> None:
    relay = PeerRelay([PeerConfig("127.0.0.1", dead_port, "http")], timeout=5.0)
    await within(relay.start())
    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: relay.peers[0].failed == 1)
    with blackholed_port() as port:
        # Still failing, now slowly: the next attempts would each hang.
        relay.peers[0].url = f"http://127.0.0.1:{port}/"
        for n in range(2, 5):
            relay.relay("default", {"touched": ["self"]}, message(n))
        started = time.perf_counter()
        await within(relay.close(timeout=2.0))
        assert time.perf_counter() - started < scaled(0.2)


_HUNG_LOOKUP = """
import asyncio, socket, sys, threading, time
sys.path[:0] = {paths!r}
from fastaphlict.config import PeerConfig
from fastaphlict.peers import PeerRelay

real = socket.getaddrinfo
started = threading.Event()

def hung(host, *args, **kwargs):
    if host == "hung.invalid":
        started.set()
        time.sleep({hang})  # a DNS server that never answers
    return real(host, *args, **kwargs)

socket.getaddrinfo = hung

async def main():
    relay = PeerRelay([PeerConfig("hung.invalid", 80, "http")])
    await relay.start()
    relay.relay("default", {{}}, b"{{}}")
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    await relay.close(timeout=0.1)

asyncio.run(main())  # the plain loop's lookups run in its executor, joined at exit
print("exiting", flush=True)
"""


def test_a_hung_name_lookup_does_not_hold_the_process_at_exit() -> None:
    code = _HUNG_LOOKUP.format(paths=sys.path, hang=scaled(30))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exiting\n"
    assert time.monotonic() - started < scaled(10), "waited for the lookup"


# -- a node of a broker cluster (join_cluster) ------------------------------------------


async def test_a_relayed_copy_lists_the_broker_cluster_in_touched(start_peer, relays) -> None:
    """The mesh peer then relays it to none of the cluster's nodes: they have it already."""
    fake = await start_peer(fingerprint="MeshPeerNodeJS01")
    relay = await relays([fake.config])
    members = ["ClusterMember001", "ClusterMember002"]
    relay.join_cluster(lambda: members)
    msg = {"key": "1", "subscribers": [], "touched": ["ThisNode00000000"]}
    relay.relay("default", msg, json.dumps(msg).encode())
    await eventually(lambda: len(fake.bodies) == 1)
    assert json.loads(fake.bodies[0])["touched"] == ["ThisNode00000000", *members]
    assert msg["touched"] == ["ThisNode00000000"], "the published message is not modified"

    # A member already in touched is not listed twice.
    msg = {"key": "2", "subscribers": [], "touched": ["ClusterMember002", "ThisNode00000000"]}
    relay.relay("default", msg, json.dumps(msg).encode())
    await eventually(lambda: len(fake.bodies) == 2)
    touched = json.loads(fake.bodies[1])["touched"]
    assert touched == ["ClusterMember002", "ThisNode00000000", "ClusterMember001"]


async def test_the_cluster_is_asked_at_each_relay(start_peer, relays) -> None:
    """Members come and go: the list is read per message, not once."""
    fake = await start_peer()
    relay = await relays([fake.config])
    members: list[str] = []
    relay.join_cluster(lambda: members)
    relay.relay("default", {"touched": ["self"]}, message(1))
    members.append("JoinedLater00001")
    relay.relay("default", {"touched": ["self"]}, message(2))
    await eventually(lambda: len(fake.bodies) == 2)
    assert fake.bodies[0] == message(1), "no member yet: the body as it is"
    assert json.loads(fake.bodies[1])["touched"] == ["self", "JoinedLater00001"]


async def test_a_peer_that_is_a_cluster_member_is_not_relayed_to(start_peer, relays) -> None:
    member = await start_peer(fingerprint="ClusterMember001")
    outsider = await start_peer(fingerprint="MeshPeerNodeJS01")
    relay = await relays([member.config, outsider.config])
    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: all(p.fingerprint for p in relay.peers))
    assert len(member.bodies) == len(outsider.bodies) == 1

    relay.join_cluster(lambda: ["ClusterMember001"])
    relay.relay("default", {"touched": ["self"]}, message(2))
    assert relay.peers[0].queued == 0, "decided synchronously: nothing queued for the member"
    await eventually(lambda: len(outsider.bodies) == 2)
    assert len(member.bodies) == 1
    assert json.loads(outsider.bodies[1])["touched"] == ["self", "ClusterMember001"]


async def test_nothing_is_relayed_when_every_peer_is_a_cluster_member(start_peer, relays) -> None:
    member = await start_peer(fingerprint="ClusterMember001")
    relay = await relays([member.config])
    relay.relay("default", {"touched": ["self"]}, message(1))
    await eventually(lambda: relay.peers[0].fingerprint is not None)
    relay.join_cluster(lambda: ["ClusterMember001"])
    relay.relay("default", {"touched": ["self"]}, message(2))
    relay.relay("default", {"touched": ["self", "ClusterMember001"]}, message(3))
    assert relay.peers[0].queued == 0
    await asyncio.sleep(scaled(0.05))
    assert member.bodies == [message(1)]


async def test_a_cluster_that_raises_never_reaches_the_poster(start_peer, relays, caplog) -> None:
    fake = await start_peer()
    relay = await relays([fake.config])

    def broken() -> list[str]:
        raise RuntimeError("boom")

    relay.join_cluster(broken)
    relay.relay("default", {"touched": ["self"]}, message(1))  # must not raise
    assert "relay failed for instance default" in caplog.text
