"""The browser tabs: WebSocket listeners that record what arrives, opened and closed in bulk."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from array import array
from collections.abc import Iterator, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from fastaphlict.bench.model import PING, PONG, Model, Options, effective_connect_concurrency

# -- the browser tabs ---------------------------------------------------------


class Collector:
    """Shared counters of every tab; plain attributes, updated per frame."""

    __slots__ = ("done", "duplicates", "foreign", "last_ns", "latencies", "received", "wanted")

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.received = 0
        self.duplicates = 0
        self.foreign = 0
        self.last_ns = 0
        self.latencies = array("q")
        self.done = asyncio.Event()
        if wanted == 0:
            self.done.set()


class _Socket(WSListener):
    """What every generator tab shares: its transport, a pong waiter, a close waiter."""

    __slots__ = ("closed", "pong", "transport")

    def __init__(self) -> None:
        super().__init__()
        self.pong: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] | None = None
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        closed = self.closed
        if closed is not None and not closed.done():
            closed.set_result(None)
        pong = self.pong
        if pong is not None and not pong.done():
            pong.set_exception(ConnectionError("socket closed while waiting for a pong"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            self.on_text(frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.CLOSE:
            transport.disconnect()

    def on_text(self, payload: bytes) -> None:
        """One text frame from the server."""


class Tab(_Socket):
    """One browser tab: answers pongs to whoever waits, records every delivery.

    ``seen[m]`` is 1 once message ``m`` arrived, so duplicates are caught on
    arrival and loss is exact afterwards.
    """

    __slots__ = ("collector", "seen")

    def __init__(self, collector: Collector, messages: int) -> None:
        super().__init__()
        self.collector = collector
        self.seen = bytearray(messages)

    def on_text(self, payload: bytes) -> None:
        collector = self.collector
        if payload == PONG:
            pong = self.pong
            if pong is not None and not pong.done():
                pong.set_result(None)
            return
        now = time.monotonic_ns()
        try:
            message = orjson.loads(payload)
            mid = message["id"]
            latency = now - message["sent"]
            seen = self.seen
            if seen[mid]:
                collector.duplicates += 1
            seen[mid] = 1
        except (ValueError, KeyError, TypeError, IndexError):
            collector.foreign += 1
            return
        collector.latencies.append(latency)
        collector.received += 1
        collector.last_ns = now
        if collector.received >= collector.wanted:
            collector.done.set()

    async def sync(self, timeout: float) -> None:
        """One ping/pong round: afterwards every earlier command took effect."""
        assert self.transport is not None
        self.pong = asyncio.get_running_loop().create_future()
        self.transport.send(WSMsgType.TEXT, PING)
        try:
            await asyncio.wait_for(self.pong, timeout)
        finally:
            self.pong = None


def client_url_for(opts: Options) -> str:
    """The client URL, with ``~instance/`` added to a path that names none.

    Browsers of instance ``acme`` connect to ``/~acme/``; a URL that already
    carries a ``~`` is taken as the operator wrote it.
    """
    if not opts.instance:
        return opts.client_url
    parts = urlsplit(opts.client_url)
    if "~" in parts.path:
        return opts.client_url
    path = parts.path.rstrip("/") + f"/~{quote(opts.instance, safe='')}/"
    return urlunsplit(parts._replace(path=path))


def admin_post_url(opts: Options) -> str:
    """``POST /`` on the admin URL, with ``?instance=`` when one is named."""
    parts = urlsplit(opts.admin_url)
    query = f"instance={quote(opts.instance, safe='')}" if opts.instance else ""
    return urlunsplit(parts._replace(path="/", query=query))


async def open_tabs(
    opts: Options, model: Model, collector: Collector, timeout: float = 10.0
) -> list[Tab]:
    """Connect, subscribe and sync every tab, ``connect_concurrency`` at a time.

    A tab counts as open only once its pong came back, so when this returns
    every subscription is in force on the server.
    """
    url = client_url_for(opts)
    tabs: list[Tab | None] = [None] * opts.sockets
    next_index = iter(range(opts.sockets))
    messages = len(model.messages)

    async def open_one(i: int) -> Tab:
        last: BaseException | None = None
        for _attempt in range(3):
            try:
                _, tab = await asyncio.wait_for(
                    ws_connect(
                        lambda: Tab(collector, messages),
                        url,
                        use_aiofastnet=False,
                        websocket_handshake_timeout=timeout,
                        read_buffer_init_size=4096,
                        max_frame_size=16 * 1024 * 1024,
                    ),
                    timeout,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.2)
                continue
            assert isinstance(tab, Tab) and tab.transport is not None
            tab.transport.send(
                WSMsgType.TEXT,
                orjson.dumps({"command": "subscribe", "data": model.subscriptions[i]}),
            )
            await tab.sync(timeout)
            return tab
        raise ConnectionError(f"socket {i}: cannot connect to {url}: {last!r}")

    async def worker() -> None:
        for i in next_index:
            tabs[i] = await open_one(i)

    workers = [asyncio.ensure_future(worker()) for _ in range(effective_connect_concurrency(opts))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await close_tabs([t for t in tabs if t is not None])
        raise
    return [t for t in tabs if t is not None]


async def sync_all(tabs: Sequence[Tab], timeout: float) -> None:
    """A ping round on every tab: flushes anything the server still had to send."""
    await asyncio.gather(*(tab.sync(timeout) for tab in tabs))


async def close_tabs(tabs: Sequence[Tab | StormTab], timeout: float = 10.0) -> None:
    """Close every tab and wait until their descriptors are released."""
    loop = asyncio.get_running_loop()
    waits = []
    for tab in tabs:
        transport = tab.transport
        if transport is None or transport.is_disconnected:
            continue
        tab.closed = loop.create_future()
        waits.append(tab.closed)
        transport.disconnect(graceful=False)
    if waits:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Keep the generator's garbage collector out of the measured window.

    After set-up the generator holds tens of thousands of long-lived objects
    (tabs, transports, futures); a full collection over them takes
    milliseconds and would show up as server latency. Per-frame garbage is
    freed by reference counting, so nothing accumulates meanwhile.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class StormTab(_Socket):
    """A reconnecting tab: records the ids replayed to it, in arrival order, until its pong."""

    __slots__ = ("foreign", "ids", "index", "late", "pong_ns")

    def __init__(self) -> None:
        super().__init__()
        self.index = -1
        self.ids = array("i")
        self.foreign = 0
        self.late = 0  # frames after the pong: a server that reordered replay and pong
        self.pong_ns = 0

    def on_text(self, payload: bytes) -> None:
        if payload == PONG:
            if not self.pong_ns:
                self.pong_ns = time.monotonic_ns()
            pong = self.pong
            if pong is not None and not pong.done():
                pong.set_result(None)
            return
        if self.pong_ns:
            self.late += 1
        try:
            self.ids.append(orjson.loads(payload)["id"])
        except (ValueError, KeyError, TypeError, OverflowError):
            self.foreign += 1
