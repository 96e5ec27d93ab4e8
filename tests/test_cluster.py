"""Cluster peers across real processes (spec §5): relay, touched, learned fingerprints.

Every test here starts ``python -m fastaphlict --config=PATH`` processes with an
Aphlict JSON config on free loopback ports, peers them through ``cluster``, and
watches from outside only: Phorge-style posts to the admin port, browsers on the
client port, ``/status/``, and the process log (stderr, captured to a file
that stays in the test's ``tmp_path`` for a post-mortem).

Proving that something did *not* happen: a relay is asynchronous, so "no
duplicate yet" means nothing on its own. Each peer relays in order through one
queue, so a marker posted *after* the fact, and routed through the same queues,
must arrive before any late duplicate could; the tests wait for the marker and
require it to be the very next frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support import (
    PHORGE_CONTENT_TYPE,
    TIMEOUT,
    Browser,
    ServerProcess,
    assert_silent,
    eventually,
    free_ports,
    scaled,
    spawn,
    stop,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(60)

TOPIC = "PHID-1"


def message(name: str, *subscribers: str, touched: list[str] | None = None) -> dict[str, Any]:
    """A Phorge-shaped notification; ``name`` is its ``uniqueID``."""
    msg: dict[str, Any] = {
        "key": name,
        "type": "notification",
        "subscribers": list(subscribers or (TOPIC,)),
        "uniqueID": name,
    }
    if touched is not None:
        msg["touched"] = touched
    return msg


def mark_topic(index: int) -> str:
    """A PHID only the browser on node ``index`` subscribes to."""
    return f"PHID-MARK-{index}"


async def expect(browser: Browser, name: str) -> dict[str, Any]:
    """The next frame must be message ``name``; return it."""
    got = await browser.recv()
    assert got.get("uniqueID") == name, f"expected {name}, got {got}"
    return got


@dataclass
class Node:
    """One fastaphlict process of the cluster (a :func:`spawn`ed one): its name and fingerprint."""

    process: ServerProcess
    name: str
    fingerprint: str = ""

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def admin_url(self) -> str:
        return self.process.admin_url

    @property
    def client_url(self) -> str:
        return self.process.client_url

    def log(self) -> str:
        return self.process.log()

    @property
    def peer_url(self) -> str:
        """How a peer's relay names this node in its log."""
        return f"http://127.0.0.1:{self.process.admin_port}/"

    def loopbacks(self) -> int:
        """Loopbacks this node dropped; logged only when it runs with ``--debug``."""
        return self.log().count("loopback dropped")

    def learned(self, peer: Node) -> bool:
        """Whether this node's relay has learned ``peer``'s fingerprint from a receipt."""
        return f"peer {peer.peer_url} has fingerprint {peer.fingerprint}" in self.log()

    def read_fingerprint(self) -> None:
        found = re.search(r"fastaphlict\.server: fingerprint (\S+)", self.log())
        assert found, self.log()
        self.fingerprint = found.group(1)


class Cluster:
    """Spawns nodes, talks to them over HTTP and WebSocket, stops them all."""

    def __init__(self, directory: Path, session: aiohttp.ClientSession) -> None:
        self.directory = directory
        self.session = session
        self.nodes: list[Node] = []

    async def start(
        self,
        topology: Sequence[Sequence[int]],
        *,
        extra_peers: Sequence[int] = (),
        debug: Collection[int] = (),
    ) -> list[Node]:
        """Start one node per entry of ``topology``, all at once.

        ``topology[i]`` lists the nodes (by index) that node ``i`` names in its
        ``cluster``; ``extra_peers`` are admin ports every node also lists;
        nodes whose index is in ``debug`` run with ``--debug=1``.
        """
        ports = free_ports(2 * len(topology))
        admin_ports = ports[1::2]
        nodes = []
        for index, peering in enumerate(topology):
            peers = [admin_ports[j] for j in peering] + list(extra_peers)
            process = spawn(
                self.directory / f"{index}.log",
                *(["--debug=1"] if index in debug else []),
                config={
                    "cluster": [{"host": "127.0.0.1", "port": p, "protocol": "http"} for p in peers]
                },
                ports=ports[2 * index : 2 * index + 2],
            )
            node = Node(process, chr(ord("A") + index))
            nodes.append(node)
        self.nodes.extend(nodes)
        await asyncio.gather(*(wait_healthy(node.process, self.session) for node in nodes))
        for node in nodes:
            node.read_fingerprint()
        return nodes

    async def restart(self, node: Node) -> Node:
        """Start ``node``'s config again, on its ports: a new process, log and fingerprint.

        The old process must be gone (killed or stopped); the returned node
        replaces it, and ``stop()`` takes care of it like the others.
        """
        index = ord(node.name) - ord("A")
        lives = sum(1 for n in self.nodes if n.name == node.name)
        again = Node(
            node.process.restart(self.directory / f"{index}-restart{lives}.log"), node.name
        )
        self.nodes.append(again)
        await wait_healthy(again.process, self.session)
        again.read_fingerprint()
        return again

    def stop(self) -> None:
        """SIGTERM everyone, then give all of them one shared deadline before killing."""
        stop(*(node.process for node in self.nodes))

    async def post(self, node: Node, msg: dict[str, Any]) -> dict[str, Any]:
        """Post as Phorge does (raw JSON, form content type); return the receipt."""
        async with self.session.post(
            f"{node.admin_url}/",
            data=json.dumps(msg).encode(),
            headers={"Content-Type": PHORGE_CONTENT_TYPE},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        ) as resp:
            assert resp.status == 200, await resp.text()
            receipt = await resp.json(content_type=None)
        assert receipt == {"fingerprint": node.fingerprint}
        return receipt

    async def status(self, node: Node) -> dict[str, Any]:
        async with self.session.get(
            f"{node.admin_url}/status/", timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as resp:
            assert resp.status == 200
            return await resp.json()

    @contextlib.asynccontextmanager
    async def browsers(self, nodes: Sequence[Node]) -> AsyncIterator[list[Browser]]:
        """One browser per node, subscribed to TOPIC and to its own marker topic."""
        async with contextlib.AsyncExitStack() as stack:
            browsers = []
            for index, node in enumerate(nodes):
                ws = await stack.enter_async_context(
                    connect(f"{node.client_url}/", open_timeout=TIMEOUT)
                )
                browser = Browser(ws)
                await browser.subscribe(TOPIC, mark_topic(index))
                browsers.append(browser)
            yield browsers

    async def assert_nothing_more(self, nodes: Sequence[Node], browsers: Sequence[Browser]) -> int:
        """Prove no duplicate is pending anywhere; return how many markers were posted.

        For every browser, a marker is posted to every *other* node. Each lands
        in that node's relay queues behind anything relayed earlier, so a late
        duplicate would arrive ahead of some marker: the next frames must be
        exactly the markers.
        """
        posted = 0
        for target in range(len(nodes)):
            for via, node in enumerate(nodes):
                if via != target:
                    await self.post(node, message(f"mark-{target}-via-{via}", mark_topic(target)))
                    posted += 1
        for target, browser in enumerate(browsers):
            expected = {f"mark-{target}-via-{via}" for via in range(len(nodes)) if via != target}
            got = [(await browser.recv()).get("uniqueID") for _ in expected]
            assert sorted(got) == sorted(expected), f"browser on {nodes[target].name}: {got}"
            await assert_silent(browser)
        return posted


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession() as session:
        nodes = Cluster(tmp_path, session)
        try:
            yield nodes
        finally:
            nodes.stop()


# -- two nodes peered with each other ---------------------------------------


async def test_two_peered_nodes_deliver_each_message_once_on_both(cluster: Cluster) -> None:
    a, b = await cluster.start([[1], [0]])
    async with cluster.browsers([a, b]) as (on_a, on_b):
        await cluster.post(a, message("m1"))
        assert (await expect(on_a, "m1"))["touched"] == [a.fingerprint]
        assert (await expect(on_b, "m1"))["touched"] == [a.fingerprint, b.fingerprint]

        await cluster.post(b, message("m2"))
        assert (await expect(on_b, "m2"))["touched"] == [b.fingerprint]
        assert (await expect(on_a, "m2"))["touched"] == [b.fingerprint, a.fingerprint]

        markers = await cluster.assert_nothing_more([a, b], [on_a, on_b])

    for node in (a, b):
        status = await cluster.status(node)
        # Loopbacks (m1 relayed back to A, for one) are answered but never counted.
        assert status["messages.in"] == 2 + markers, node.name
        # m1, m2 and the node's own marker, each delivered to its one browser once.
        assert status["messages.out"] == 3, node.name


# -- three nodes: ring and full mesh ----------------------------------------

TOPOLOGIES = {
    "ring": [[1], [2], [0]],  # A -> B -> C -> A
    "mesh": [[1, 2], [0, 2], [0, 1]],  # each lists the other two
}


@pytest.mark.parametrize(
    "shape",
    [
        "ring",
        "mesh",
    ],
)
async def test_three_nodes_deliver_each_message_once_everywhere(
    cluster: Cluster, shape: str
) -> None:
    nodes = await cluster.start(TOPOLOGIES[shape])
    if shape == "mesh":
        # A copy can only name the peers whose fingerprints are known: until
        # every node has heard a receipt from each of its peers, a mesh may
        # deliver twice (as Aphlict always does). Warm up with messages that
        # reach nobody, then hold the mesh to exactly once.
        for node in nodes:
            await cluster.post(node, {"subscribers": [], "uniqueID": "warm-up"})
        await eventually(
            lambda: all(
                nodes[i].learned(nodes[j])
                for i, peers in enumerate(TOPOLOGIES[shape])
                for j in peers
            )
        )
    async with cluster.browsers(nodes) as browsers:
        for origin, node in enumerate(nodes):
            name = f"from-{node.name}"
            await cluster.post(node, message(name))
            for index, browser in enumerate(browsers):
                touched = (await expect(browser, name))["touched"]
                if shape == "ring":
                    hops = (index - origin) % len(nodes)
                    path = [nodes[(origin + h) % len(nodes)].fingerprint for h in range(hops + 1)]
                    assert touched == path
                else:
                    assert touched[0] == node.fingerprint
                    assert touched[-1] == nodes[index].fingerprint
                    assert len(set(touched)) == len(touched)
        markers = await cluster.assert_nothing_more(nodes, browsers)

    if shape == "ring":
        # (In the mesh, late copies of the warm-up may still be counted; the
        # browsers and their markers above are the proof of exactly once.)
        for node in nodes:
            status = await cluster.status(node)
            assert status["messages.in"] == len(nodes) + markers, node.name


# -- a node that lists itself ------------------------------------------------


async def test_self_peer_loops_back_once_then_stops_relaying(cluster: Cluster) -> None:
    # --debug makes every dropped loopback a log line: the only outside view of
    # a relay that ends in a loopback.
    (node,) = await cluster.start([[0]], debug={0})
    async with cluster.browsers([node]) as (browser,):
        started = time.perf_counter()
        await cluster.post(node, message("m1"))
        assert (await expect(browser, "m1"))["touched"] == [node.fingerprint]
        await eventually(lambda: node.learned(node))
        settled = time.perf_counter() - started
        assert node.loopbacks() == 1

        await cluster.post(node, message("m2"))
        assert (await expect(browser, "m2"))["touched"] == [node.fingerprint]
        # Nothing can queue behind a relay to ourselves (every message we publish
        # carries our fingerprint), so no marker can prove its absence: watch for
        # ten times as long as the first relay round took instead.
        quiet_until = time.monotonic() + scaled(min(2.0, max(0.5, 10 * settled)))
        while time.monotonic() < quiet_until:
            assert node.loopbacks() == 1, "m2 was relayed to ourselves"
            await asyncio.sleep(0.02)
        await assert_silent(browser)

    status = await cluster.status(node)
    assert status["messages.in"] == 2
    assert status["messages.out"] == 2
    log = node.log()
    for bad in (" ERROR ", " WARNING ", " CRITICAL ", "Traceback"):
        assert bad not in log, log


# -- peers that are down or hang ----------------------------------------------


async def test_dead_and_hung_peers_never_delay_the_receipt(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    (dead,) = free_ports(1)
    received = bytearray()
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        hung_port = hung.sockets[0].getsockname()[1]
        (node,) = await cluster.start([[]], extra_peers=[dead, hung_port])
        async with cluster.browsers([node]) as (browser,):
            latencies = []
            for n in range(20):
                started = time.perf_counter()
                await cluster.post(node, message(f"m{n}"))
                latencies.append(time.perf_counter() - started)
            for n in range(20):
                await expect(browser, f"m{n}")
            await assert_silent(browser)

        worst, median = max(latencies), statistics.median(latencies)
        record_property("receipt_latency_max_s", round(worst, 6))
        record_property("receipt_latency_median_s", round(median, 6))
        print(
            f"receipt latency over 20 posts: max {worst * 1e3:.2f} ms, median {median * 1e3:.2f} ms"
        )
        assert worst < scaled(0.5), latencies

        # The relays really were attempted: the dead peer is reported failing,
        # the hung one holds our first request unanswered.
        await eventually(lambda: f"peer http://127.0.0.1:{dead}/ failing" in node.log())
        await eventually(lambda: received.startswith(b"POST /?instance=default "))
        assert (await cluster.status(node))["messages.in"] == 20
    finally:
        for writer in connections:
            writer.close()
        hung.close()
        await asyncio.wait_for(hung.wait_closed(), TIMEOUT)


# -- fingerprints are learned from receipts ---------------------------------


async def test_peer_fingerprint_learned_from_receipt_skips_touched_peer(cluster: Cluster) -> None:
    # B lists A; A lists nobody. A runs with --debug so that any loopback it
    # drops is logged: without learning, B would still post m2 to A, and A would
    # drop it silently, so A's browser alone could not tell the difference.
    a, b = await cluster.start([[], [0]], debug={0})
    async with cluster.browsers([a, b]) as (on_a, on_b):
        receipt = await cluster.post(a, message("m0"))
        a_fp = receipt["fingerprint"]
        await expect(on_a, "m0")

        # m1 goes B -> A; A's receipt teaches B A's fingerprint.
        await cluster.post(b, message("m1"))
        assert (await expect(on_b, "m1"))["touched"] == [b.fingerprint]
        assert (await expect(on_a, "m1"))["touched"] == [b.fingerprint, a_fp]
        await eventually(lambda: b.learned(a))

        # m2 claims to have passed through A already: B delivers it but must skip A.
        await cluster.post(b, message("m2", touched=[a_fp]))
        assert (await expect(on_b, "m2"))["touched"] == [a_fp, b.fingerprint]

        # m3 goes to A through the same relay queue m2 would have used, so by the
        # time A delivers m3 it has already handled any relayed m2.
        await cluster.post(b, message("m3"))
        await expect(on_b, "m3")
        await expect(on_a, "m3")
        assert a.loopbacks() == 0, "B relayed m2 to A although A had touched it"

        # Control: a loopback A does receive is logged, so the zero above means something.
        await cluster.post(a, message("m4", touched=[a_fp]))
        assert a.loopbacks() == 1
        await assert_silent(on_a)
        await assert_silent(on_b)

    assert (await cluster.status(a))["messages.in"] == 3  # m0, m1, m3
    assert (await cluster.status(b))["messages.in"] == 3  # m1, m2, m3


# -- peers that answer garbage, errors, or slowly ----------------------------------


@contextlib.asynccontextmanager
async def fake_peer(
    handler: Callable[[web.Request], Any],
) -> AsyncIterator[tuple[int, list[float]]]:
    """An HTTP server on a free port answering every request with ``handler``.

    Yields its port and the arrival time of every request it got.
    """
    arrivals: list[float] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        await request.read()
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], arrivals
    finally:
        await asyncio.wait_for(runner.cleanup(), TIMEOUT)


@contextlib.asynccontextmanager
async def garbage_speaker() -> AsyncIterator[tuple[int, list[float]]]:
    """A TCP server that answers any connection with bytes that aren't HTTP, then hangs up."""
    arrivals: list[float] = []

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrivals.append(time.monotonic())
        with contextlib.suppress(ConnectionError):
            await reader.read(65536)
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(speak, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], arrivals
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def _not_json(request: web.Request) -> web.Response:
    return web.Response(status=200, body=b"<html>it works</html>", content_type="text/html")


async def _server_error(request: web.Request) -> web.Response:
    return web.Response(status=500, text="internal error")


#: How long the slow peer takes over each relay.
SLOW_ANSWER = 1.0


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(SLOW_ANSWER)
    return web.json_response({"fingerprint": "slowslowslowslow"})


async def test_garbage_error_and_slow_peers_never_delay_receipts_or_delivery(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    posts = 20
    async with contextlib.AsyncExitStack() as stack:
        not_json, not_json_hits = await stack.enter_async_context(fake_peer(_not_json))
        error, error_hits = await stack.enter_async_context(fake_peer(_server_error))
        slow, slow_hits = await stack.enter_async_context(fake_peer(_slow))
        garbage, garbage_hits = await stack.enter_async_context(garbage_speaker())
        failing = {"not-json": not_json, "500": error, "garbage": garbage}
        (node,) = await cluster.start([[]], extra_peers=[*failing.values(), slow])

        async with cluster.browsers([node]) as (browser,):
            receipts, deliveries = [], []
            for n in range(posts):
                started = time.perf_counter()
                await cluster.post(node, message(f"m{n}"))
                receipts.append(time.perf_counter() - started)
                await expect(browser, f"m{n}")
                deliveries.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)  # spread the posts over the slow peer's answers
            await assert_silent(browser)

        record_property("receipt_latency_max_s", round(max(receipts), 6))
        record_property("delivery_latency_max_s", round(max(deliveries), 6))
        assert max(receipts) < scaled(0.5), receipts
        assert max(deliveries) < scaled(0.5), deliveries

        # Every failing peer was tried for every message (no message is held
        # back for them), and the slow one is still working through its queue.
        await eventually(
            lambda: min(map(len, (not_json_hits, error_hits, garbage_hits))) >= posts,
            timeout=scaled(10.0),
        )
        learned = f"peer http://127.0.0.1:{slow}/ has fingerprint slowslowslowslow"
        await eventually(lambda: learned in node.log(), timeout=SLOW_ANSWER + TIMEOUT)
        assert 1 <= len(slow_hits) < posts
        gaps = [b - a for a, b in itertools.pairwise(slow_hits)]
        assert all(gap >= SLOW_ANSWER * 0.9 for gap in gaps), "one relay at a time, in order"

        assert node.proc.poll() is None, node.log()
        log = node.log()
        for name, port in failing.items():
            failures = log.count(f"peer http://127.0.0.1:{port}/ failing")
            assert failures == 1, f"{name} peer: {failures} failure line(s), not one\n{log}"
        assert f"peer http://127.0.0.1:{slow}/ failing" not in log
        assert "Traceback" not in log, log
        assert (await cluster.status(node))["messages.in"] == posts


# -- odd touched entries still relay ------------------------------------------------


async def test_touched_holding_non_strings_is_still_relayed(cluster: Cluster) -> None:
    """``touched`` is the poster's: objects, lists and numbers in it must not stop the relay."""
    a, b = await cluster.start([[1], []])
    async with cluster.browsers([a, b]) as (on_a, on_b):
        odd = [{"x": 1}, ["y"], 3, None, "not-a-fingerprint"]
        await cluster.post(a, message("m1", touched=odd))
        assert (await expect(on_a, "m1"))["touched"] == [*odd, a.fingerprint]
        assert (await expect(on_b, "m1"))["touched"] == [*odd, a.fingerprint, b.fingerprint]
        await assert_silent(on_a)
    for bad in ("Traceback", " ERROR "):
        assert bad not in a.log(), a.log()


# -- a ring that loses a node mid-stream -------------------------------------------


async def test_ring_node_killed_and_restarted_mid_stream_delivers_at_most_once(
    cluster: Cluster,
) -> None:
    """Ring A -> B -> C -> A; messages posted to A; B is killed and restarted mid-stream.

    C hears of A's messages only through B, so what was posted while B was
    down may never reach C. The contract, precisely:

    - no browser ever gets a message twice (markers at the end prove that
      nothing late is still on its way);
    - A's browser gets every message, in order;
    - C's browser gets, in order, a subset that holds every message posted
      after the new B answered ``/healthz``;
    - the new B's browser gets, in order, a subset that holds every message
      posted after it subscribed;
    - A and C live through it, and A logs B failing once and recovering once
      (not once per message), and learns B's new fingerprint.
    """
    a, b, c = await cluster.start([[1], [2], [0]])
    pace = 0.05
    names: list[str] = []

    async def post_next() -> None:
        name = f"m{len(names)}"
        names.append(name)
        await cluster.post(a, message(name))
        await asyncio.sleep(pace)

    async with contextlib.AsyncExitStack() as stack:
        on_a, on_b, on_c = await stack.enter_async_context(cluster.browsers([a, b, c]))
        for _ in range(10):
            await post_next()

        b.proc.kill()  # SIGKILL: relays to B in flight are cut off
        b.proc.wait(TIMEOUT)
        for _ in range(5):
            await post_next()

        restarting = asyncio.create_task(cluster.restart(b))
        while not restarting.done():  # keep the stream going while B starts
            await post_next()
        b2 = await restarting
        ready = len(names)  # posted after B answered /healthz
        for _ in range(5):
            await post_next()

        ws = await stack.enter_async_context(connect(f"{b2.client_url}/", open_timeout=TIMEOUT))
        on_b2 = Browser(ws)
        await on_b2.subscribe(TOPIC, mark_topic(1))
        subscribed = len(names)
        for _ in range(10):
            await post_next()

        async def drain(browser: Browser, node: str) -> list[str]:
            """Read up to the last message (relays keep order, so it comes last)."""
            got: list[str] = []
            while not got or got[-1] != names[-1]:
                got.append((await browser.recv())["uniqueID"])
            assert len(got) == len(set(got)), f"{node}: duplicates in {got}"
            assert got == sorted(got, key=names.index), f"{node}: out of order: {got}"
            return got

        assert await drain(on_a, "A") == names
        got_c = await drain(on_c, "C")
        assert set(names[ready:]) <= set(got_c), f"C missed some of {names[ready:]}: {got_c}"
        got_b2 = await drain(on_b2, "new B")
        assert set(names[subscribed:]) <= set(got_b2), f"new B: {got_b2}"

        # The old B's browser: whatever it got before the kill, once and in order.
        got_b: list[str] = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                got_b.append((await on_b.recv())["uniqueID"])
        assert len(got_b) == len(set(got_b)) and got_b == sorted(got_b, key=names.index), got_b

        print(
            f"{len(names)} posted; B down from m10, ready before m{ready}, subscribed before"
            f" m{subscribed}; C got {len(got_c)}, new B {len(got_b2)}, old B {len(got_b)}"
        )
        markers = await cluster.assert_nothing_more([a, b2, c], [on_a, on_b2, on_c])
        assert markers == 6

    for node in (a, c):
        assert node.proc.poll() is None, node.log()
    log = a.log()
    assert log.count(f"peer {b.peer_url} failing") == 1, log
    assert log.count(f"peer {b.peer_url} recovered") == 1, log
    assert f"peer {b.peer_url} fingerprint changed from {b.fingerprint} to {b2.fingerprint}" in log
    for node in (a, b2, c):
        assert "Traceback" not in node.log(), node.log()
