"""Load generator for any Aphlict-compatible notification server (``fastaphlict-bench``).

It plays both of Aphlict's clients at once: N browser tabs holding WebSockets
on the client port, each subscribed the way ``JX.Aphlict`` subscribes (its
user PHID plus the object PHIDs of the page), and Phorge's PHP posting
messages to the admin port (raw JSON under curl's default form content type).
Every message carries ``id`` and ``sent`` (``time.monotonic_ns()`` when the post
was issued); the tabs read them back to count deliveries and time them.

What it reports, and why each figure can be trusted:

- **Loss is exact.** The subscription model is built here, so the set of
  sockets each message must reach is computed before posting; every socket
  records which message ids it saw, and loss, duplicates and unexpected
  deliveries come from comparing the two, not from totals.
- **Subscriptions are in force before the first post.** Each socket sends its
  ``subscribe`` then a ``ping``; Aphlict runs one socket's commands in order,
  so its ``pong`` proves the subscription took effect. No sleeps.
- **Server CPU is the server's.** Given ``--server-pid``, the server's CPU time
  is read from ``/proc`` right before a window's first post and right after
  its last expected delivery arrives, and divided by deliveries and by
  messages. The generator runs in its own process, so none of its work is
  counted. With ``--windows W`` the messages are posted in W slices measured
  separately and the medians reported: on a shared machine a neighbour's
  burst then spoils one window, not the figure.
- **The floor is measured, not assumed.** A helper process accepts the same
  number of loopback TCP connections and sends the same frame bytes to the
  same sockets per message with plain Python ``send()``; its CPU per send is the
  cost of the system calls any server must make. Server CPU per delivery over
  that floor is a ratio that survives a change of machine; absolute times do
  not.

Latency includes the generator's own delay: it posts through aiohttp and reads
every socket in one Python process, so a frame waits while the generator is
busy with another post or socket. It is a fair publish-to-receive figure only
when the generator is far from saturated, which is what the paced
(``--rate``) runs are for; in broadcast and burst runs it mostly measures how
fast one Python process drains 10000 sockets.

The ``storm`` scenario plays a node restart instead: a busy minute of history
is posted first, then every tab reconnects at once and sends what
``JX.Aphlict`` sends (``subscribe``, ``replay``, ``ping``). Each tab's replay
is checked against the model (the messages naming its PHIDs, once, oldest
first, before its pong); the server's CPU is read around the storm; a watcher
tab in a separate process pings throughout, and its worst round trip is how
long the storm left an established tab unanswered. It needs a server with an
empty history (a fresh one); only the protocol is used, so Node Aphlict can be
measured the same way.

Run ``fastaphlict-bench --help`` for the command line; the pytest scenarios in
``benchmarks/`` call :func:`run_scenario` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import glob
import multiprocessing
import os
import random
import resource
import socket
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

__all__ = [
    "SCENARIOS",
    "FloorResult",
    "Model",
    "Options",
    "Result",
    "build_model",
    "main",
    "raise_nofile_limit",
    "run_floor",
    "run_scenario",
    "run_storm",
    "server_cpu_seconds",
    "server_rss_bytes",
    "ws_frame",
]

Scenario = Literal["targeted", "broadcast", "burst", "idle", "storm"]
SCENARIOS: tuple[Scenario, ...] = ("targeted", "broadcast", "burst", "idle", "storm")

#: What Phorge's curl sends: raw JSON under the form content type.
PHORGE_CONTENT_TYPE = "application/x-www-form-urlencoded"
_PING = b'{"command":"ping","data":null}'
#: What JX.Aphlict sends after its subscribe on every (re)connect.
_REPLAY = b'{"command":"replay","data":{"age":60000}}'
_PONG = b'{"type":"pong"}'
#: Object PHIDs per tab, users and objects per message: the targeted mix.
OBJECTS_PER_TAB = 5
USERS_PER_MESSAGE = 20
#: One object PHID per this many sockets keeps ~25 tabs on each object, so a
#: targeted message reaches ~45 sockets (20 users + ~25 object watchers) at any
#: socket count; that is what makes the scaling runs comparable.
SOCKETS_PER_OBJECT = 5
#: The PHID every tab of the broadcast and burst mixes listens to.
TOPIC_PHID = "PHID-PROJ-00000000000000000001"
#: A server's fingerprint is 16 characters; the floor frame carries one.
_FAKE_TOUCHED = ["x" * 16]
_KEY_BASE = 7_000_000_000_000_000_000


def user_phid(i: int) -> str:
    """A user PHID of Phorge's shape (type, then 20 characters)."""
    return f"PHID-USER-{i:020d}"


def object_phid(i: int) -> str:
    """An object (task) PHID of Phorge's shape."""
    return f"PHID-TASK-{i:020d}"


# -- options and results ------------------------------------------------------


@dataclass
class Options:
    """One run's parameters; the command line maps onto these one to one."""

    client_url: str = "ws://127.0.0.1:22280/"
    admin_url: str = "http://127.0.0.1:22281/"
    instance: str | None = None
    scenario: Scenario = "targeted"
    sockets: int = 1000
    messages: int = 1000
    #: Messages per second on an absolute schedule; 0 posts as fast as the
    #: concurrency allows.
    rate: float = 0.0
    #: Posts in flight at once; 0 picks the scenario's default (see
    #: :func:`effective_concurrency`).
    concurrency: int = 0
    #: Distinct users (one tab each, round robin); 0 means one per socket.
    users: int = 0
    #: Distinct object PHIDs; 0 means ``sockets // 5`` (2000 at 10000 sockets).
    objects: int = 0
    server_pid: int | None = None
    seed: int = 1
    #: Also run the plain-send floor after the scenario (not for ``idle``).
    floor: bool = True
    #: WebSocket handshakes in flight; keep it at or below the server's listen
    #: backlog (asyncio's default is 100) or refused SYNs cost 1 s retries.
    #: 0 picks the scenario's default (see :func:`effective_connect_concurrency`).
    connect_concurrency: int = 0
    #: Seconds to wait, after a window's last post is answered, for missing deliveries.
    deadline: float = 10.0
    #: Measurement windows: the messages are posted in this many slices, the
    #: server's CPU is read around each, and the figures are the medians.
    windows: int = 1
    #: storm: messages posted before the storm (the busy minute); 0 = empty history.
    history: int = 1000
    #: storm: PHIDs each tab subscribes to (its user and the page's objects).
    phids_per_tab: int = 20
    #: storm: seconds between the watcher tab's pings.
    watch_interval: float = 0.005


#: Handshakes in flight during a storm: enough to keep a server's listen
#: backlog (Node's 511, ours 4096) busy, as thousands of tabs reconnecting do.
STORM_CONNECT_CONCURRENCY = 500
#: Tabs in a storm unless told otherwise: issue 8's measurement.
STORM_TABS = 4000


def effective_connect_concurrency(opts: Options) -> int:
    """Handshakes in flight: the storm's burst, else 100 (asyncio's default backlog)."""
    if opts.connect_concurrency > 0:
        return opts.connect_concurrency
    return STORM_CONNECT_CONCURRENCY if opts.scenario == "storm" else 100


def effective_concurrency(opts: Options) -> int:
    """Posts in flight: burst 64; paced runs 32 (a slow answer must not stall
    the schedule); otherwise 1, so each message's cost is measured alone."""
    if opts.concurrency > 0:
        return opts.concurrency
    if opts.scenario == "burst":
        return 64
    return 32 if opts.rate > 0 else 1


@dataclass
class FloorResult:
    """The plain-``send()`` baseline: same frame, same sockets, plain Python."""

    sockets: int
    sends: int
    frame_bytes: int
    cpu_s: float
    wall_s: float
    bytes_expected: int
    bytes_received: int
    window_cpu_per_send_us: list[float] = field(default_factory=list)

    @property
    def cpu_per_send_us(self) -> float:
        """The median over windows (see :func:`run_floor`)."""
        if self.window_cpu_per_send_us:
            return _median(self.window_cpu_per_send_us)
        return self.cpu_s / self.sends * 1e6 if self.sends else 0.0


@dataclass
class Result:
    """Everything one run measured; :meth:`as_dict` is the JSON output."""

    scenario: str
    sockets: int
    messages: int
    concurrency: int | None
    rate: float
    windows: int = 1
    connect_s: float = 0.0
    deliveries_expected: int = 0
    deliveries_received: int = 0
    loss: int = 0
    duplicates: int = 0
    unexpected: int = 0
    foreign_frames: int = 0
    post_errors: int = 0
    first_post_error: str | None = None
    elapsed_s: float = 0.0
    msgs_per_s: float | None = None
    deliveries_per_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    #: The median of the windows' p99: one stall of the machine spoils one
    #: window's p99 but moves the overall p99 of a short run a lot.
    latency_p99_median_window_ms: float | None = None
    latency_p99_windows_ms: list[float] = field(default_factory=list)
    post_lag_max_ms: float = 0.0
    generator_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    server_cpu_per_delivery_us: float | None = None
    server_cpu_per_message_us: float | None = None
    server_rss_mb: float | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    bytes_per_socket: float | None = None
    frame_bytes: int = 0
    floor_sends: int | None = None
    floor_cpu_per_send_us: float | None = None
    floor_loss_bytes: int | None = None
    ratio_to_floor: float | None = None
    #: Server CPU per message beyond the floor's cost of its deliveries:
    #: matching, JSON, HTTP and event-loop work, without the kernel's sends.
    overhead_per_message_us: float | None = None
    #: Share of the machine's CPU time the hypervisor stole during the run
    #: (``/proc/stat``): a noise indicator for every figure of the run.
    steal_pct: float | None = None
    window_server_cpu_per_delivery_us: list[float] = field(default_factory=list)
    window_floor_cpu_per_send_us: list[float] = field(default_factory=list)
    #: storm: history messages posted before it, and its figures (see run_storm).
    history: int | None = None
    storm_wall_s: float | None = None
    server_cpu_per_tab_us: float | None = None
    replay_frames_expected: int | None = None
    replay_frames_received: int | None = None
    #: storm: tabs whose replay was not exactly their expected list, in order.
    replay_tabs_wrong: int = 0
    out_of_order: int = 0
    connect_retries: int = 0
    watcher_pings: int | None = None
    watcher_ping_p50_ms: float | None = None
    watcher_ping_p99_ms: float | None = None
    watcher_ping_max_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A flat dict of JSON types, floats rounded to what the noise allows."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
            elif isinstance(value, list):
                out[key] = [round(v, 4) if isinstance(v, float) else v for v in value]
        return out

    @property
    def clean(self) -> bool:
        """No loss, no duplicates, nothing unexpected, every post accepted."""
        return not (
            self.loss
            or self.duplicates
            or self.unexpected
            or self.foreign_frames
            or self.post_errors
            or self.floor_loss_bytes
            or self.replay_tabs_wrong
            or self.out_of_order
        )


# -- the subscription model ---------------------------------------------------


@dataclass
class Model:
    """Who listens to what, what each message names, and whom it must reach.

    ``targets[m]`` is the sorted list of socket indices message ``m`` must
    reach, each once; for broadcast and burst it is one shared list of every
    socket (``reaches_all``), which keeps 10000-socket runs small in memory.
    """

    subscriptions: list[list[str]]
    messages: list[list[str]]
    targets: list[list[int]]
    reaches_all: bool = False

    @property
    def expected(self) -> int:
        return sum(len(t) for t in self.targets)


def build_model(opts: Options) -> Model:
    """The deterministic (``--seed``) subscription and message mix of a scenario."""
    rng = random.Random(opts.seed)
    n = opts.sockets
    if opts.scenario in ("broadcast", "burst"):
        subs = [[user_phid(i), TOPIC_PHID] for i in range(n)]
        everyone = list(range(n))
        return Model(subs, [[TOPIC_PHID]] * opts.messages, [everyone] * opts.messages, True)

    users = opts.users or n
    objects = opts.objects or max(1, n // SOCKETS_PER_OBJECT)
    storm = opts.scenario == "storm"
    per_tab = min(max(0, opts.phids_per_tab - 1) if storm else OBJECTS_PER_TAB, objects)
    subs = []
    by_phid: dict[str, list[int]] = {}
    for i in range(n):
        phids = [user_phid(i % users)] + [
            object_phid(o) for o in rng.sample(range(objects), per_tab)
        ]
        subs.append(phids)
        for phid in phids:
            by_phid.setdefault(phid, []).append(i)
    if opts.scenario == "idle":
        return Model(subs, [], [])

    messages = []
    targets = []
    named = min(USERS_PER_MESSAGE, users)
    for _ in range(opts.history if storm else opts.messages):
        phids = [user_phid(u) for u in rng.sample(range(users), named)]
        phids.append(object_phid(rng.randrange(objects)))
        reached: set[int] = set()
        for phid in phids:
            reached.update(by_phid.get(phid, ()))
        messages.append(phids)
        targets.append(sorted(reached))
    return Model(subs, messages, targets)


def message_body(model: Model, i: int, sent_ns: int) -> dict[str, Any]:
    """Message ``i`` as Phorge posts it, plus the generator's ``sent`` and ``id``."""
    return {
        "key": str(_KEY_BASE + i),
        "type": "notification",
        "subscribers": model.messages[i],
        "sent": sent_ns,
        "id": i,
    }


def ws_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame around ``payload``, as a server writes it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


# -- /proc readings -----------------------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used so far.

    Prefers the per-thread scheduler run time in ``/proc/PID/task/*/schedstat``
    (nanoseconds: the same clock as the floor's ``time.process_time()``, and
    precise enough for a one-second run); falls back to ``utime + stime`` of
    ``/proc/PID/stat`` in clock ticks when schedstat is missing or empty.
    """
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(path) as f:
                total += int(f.read().split()[0])
    if total:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int]:
    """``(total, steal)`` clock ticks of the machine's CPUs from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def server_rss_bytes(pid: int) -> int:
    """Resident set size from ``/proc/PID/status`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return it.

    Every socket costs one descriptor and 10000-socket runs exceed the usual
    soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _check_fd_budget(sockets: int) -> None:
    limit = raise_nofile_limit()
    if limit != resource.RLIM_INFINITY and sockets + 200 > limit:
        raise RuntimeError(f"{sockets} sockets need more open files than the limit ({limit})")


# -- the browser tabs ---------------------------------------------------------


class _Collector:
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


class _Tab(_Socket):
    """One browser tab: answers pongs to whoever waits, records every delivery.

    ``seen[m]`` is 1 once message ``m`` arrived, so duplicates are caught on
    arrival and loss is exact afterwards.
    """

    __slots__ = ("collector", "seen")

    def __init__(self, collector: _Collector, messages: int) -> None:
        super().__init__()
        self.collector = collector
        self.seen = bytearray(messages)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is not WSMsgType.TEXT:
            if msg_type is WSMsgType.CLOSE:
                transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        collector = self.collector
        if payload == _PONG:
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
        self.transport.send(WSMsgType.TEXT, _PING)
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


async def _open_tabs(
    opts: Options, model: Model, collector: _Collector, timeout: float = 10.0
) -> list[_Tab]:
    """Connect, subscribe and sync every tab, ``connect_concurrency`` at a time.

    A tab counts as open only once its pong came back, so when this returns
    every subscription is in force on the server.
    """
    url = client_url_for(opts)
    tabs: list[_Tab | None] = [None] * opts.sockets
    next_index = iter(range(opts.sockets))
    messages = len(model.messages)

    async def open_one(i: int) -> _Tab:
        last: BaseException | None = None
        for _attempt in range(3):
            try:
                _, tab = await asyncio.wait_for(
                    ws_connect(
                        lambda: _Tab(collector, messages),
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
            assert isinstance(tab, _Tab) and tab.transport is not None
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
        await _close_tabs([t for t in tabs if t is not None])
        raise
    return [t for t in tabs if t is not None]


async def _sync_all(tabs: Sequence[_Tab], timeout: float) -> None:
    """A ping round on every tab: flushes anything the server still had to send."""
    await asyncio.gather(*(tab.sync(timeout) for tab in tabs))


async def _close_tabs(tabs: Sequence[_Tab | _StormTab], timeout: float = 10.0) -> None:
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


# -- posting ------------------------------------------------------------------


@dataclass
class _PostStats:
    errors: int = 0
    first_error: str | None = None
    lag_max_ns: int = 0
    done_ns: int = 0


async def _post_range(
    opts: Options,
    model: Model,
    session: aiohttp.ClientSession,
    first: int,
    stop: int,
    stats: _PostStats,
) -> None:
    """Post messages ``first`` to ``stop - 1``, paced on an absolute schedule when
    ``rate`` is set.

    The schedule is ``start + i / rate``, not "sleep 1/rate after each post",
    so a slow answer or a coarse timer never lowers the average rate; how late
    the worst post started is reported as ``post_lag_max_ms``.
    """
    url = admin_post_url(opts)
    headers = {"Content-Type": PHORGE_CONTENT_TYPE}
    limit = asyncio.Semaphore(effective_concurrency(opts))
    timeout = aiohttp.ClientTimeout(total=10)

    async def post(i: int) -> None:
        try:
            body = orjson.dumps(message_body(model, i, time.monotonic_ns()))
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
        except Exception as exc:  # counted and reported; the run goes on
            stats.errors += 1
            if stats.first_error is None:
                stats.first_error = f"message {i}: {exc!r}"
        finally:
            limit.release()

    tasks = []
    start = time.monotonic_ns()
    interval = 1e9 / opts.rate if opts.rate > 0 else 0.0
    for i in range(first, stop):
        due = start + int((i - first) * interval)
        if interval:
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
        await limit.acquire()
        if interval:
            stats.lag_max_ns = max(stats.lag_max_ns, time.monotonic_ns() - due)
        tasks.append(asyncio.ensure_future(post(i)))
    await asyncio.gather(*tasks)
    stats.done_ns = time.monotonic_ns()


def split_windows(total: int, windows: int) -> list[tuple[int, int]]:
    """``[first, stop)`` bounds cutting ``total`` messages into near-equal windows."""
    count = max(1, min(windows, total))
    bounds = [total * k // count for k in range(count + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(count)]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- the floor ----------------------------------------------------------------


def _floor_worker(
    conn: Connection,
    sockets: int,
    frame: bytes,
    targets: list[list[int]] | None,
    windows: list[tuple[int, int]],
) -> None:
    """The floor process: accept ``sockets`` connections, then send, in plain Python.

    Runs in its own process, like a server, so its CPU time is only its
    sending. Blocking sockets: a full buffer waits (off the CPU) instead of
    failing, and ``send()`` on loopback copies a small frame whole. Each
    window of rounds is timed on its own, as the scenario's windows are.
    """
    raise_nofile_limit()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.settimeout(60)
    conn.send(listener.getsockname()[1])
    socks: list[socket.socket] = []
    try:
        while len(socks) < sockets:
            sock, _ = listener.accept()
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        conn.recv()  # "go": the receivers are in place
        size = len(frame)
        timings = []
        for first, stop in windows:
            if targets is None:
                plan = [socks] * (stop - first)
            else:
                plan = [[socks[i] for i in group] for group in targets[first:stop]]
            sends = 0
            wall0 = time.perf_counter()
            cpu0 = time.process_time()
            for group in plan:
                for sock in group:
                    sent = sock.send(frame)
                    if sent != size:
                        sock.sendall(frame[sent:])
                sends += len(group)
            cpu = time.process_time() - cpu0
            timings.append((sends, cpu, time.perf_counter() - wall0))
        conn.send(timings)
        conn.recv()  # "bye": the receivers have counted every byte
    finally:
        for sock in socks:
            sock.close()
        listener.close()
        conn.close()


class _Sink(asyncio.Protocol):
    """A floor receiver: count bytes, discard them."""

    def __init__(self, counter: list[int], done: asyncio.Event, want: int) -> None:
        self.counter = counter
        self.done = done
        self.want = want

    def data_received(self, data: bytes) -> None:
        self.counter[0] += len(data)
        if self.counter[0] >= self.want:
            self.done.set()


async def _recv(conn: Connection, proc: Any, timeout: float) -> Any:
    """Receive from the floor process without blocking the event loop."""

    def wait() -> Any:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"the floor process exited (status {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError("the floor process did not answer")
        return conn.recv()

    return await asyncio.get_running_loop().run_in_executor(None, wait)


async def run_floor(
    sockets: int,
    frame: bytes,
    targets: list[list[int]] | None,
    windows: list[tuple[int, int]],
    *,
    connect_concurrency: int = 200,
    timeout: float = 60.0,
) -> FloorResult:
    """Time a plain ``send()`` of ``frame`` to ``targets[r]`` for each round ``r``.

    ``targets=None`` sends every round to all sockets; ``windows`` are the
    ``[first, stop)`` round ranges timed separately (the figure is their
    median). The receivers live in this process (as the tabs do), the sender
    in a fresh one, so the sender's CPU time is that of the sends and of
    nothing else.
    """
    _check_fd_budget(sockets)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_floor_worker, args=(child, sockets, frame, targets, windows), daemon=True
    )
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()
    counter = [0]
    if targets is None:
        sends_planned = sum(stop - first for first, stop in windows) * sockets
    else:
        sends_planned = sum(len(targets[r]) for first, stop in windows for r in range(first, stop))
    want = sends_planned * len(frame)
    done = asyncio.Event()
    transports: list[asyncio.BaseTransport] = []
    try:
        port = await _recv(parent, proc, timeout)
        limit = asyncio.Semaphore(connect_concurrency)

        async def connect() -> None:
            async with limit:
                transport, _ = await loop.create_connection(
                    lambda: _Sink(counter, done, want), "127.0.0.1", port
                )
                transports.append(transport)

        await asyncio.wait_for(asyncio.gather(*(connect() for _ in range(sockets))), timeout)
        parent.send("go")
        timings = await _recv(parent, proc, timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 10.0)
        parent.send("bye")
        return FloorResult(
            sockets=sockets,
            sends=sum(t[0] for t in timings),
            frame_bytes=len(frame),
            cpu_s=sum(t[1] for t in timings),
            wall_s=sum(t[2] for t in timings),
            bytes_expected=want,
            bytes_received=counter[0],
            window_cpu_per_send_us=[cpu / sends * 1e6 for sends, cpu, _ in timings if sends],
        )
    finally:
        for transport in transports:
            transport.abort()
        parent.close()
        await loop.run_in_executor(None, proc.join, 10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


# -- the reconnect storm --------------------------------------------------------


class _StormTab(_Socket):
    """A reconnecting tab: records the ids replayed to it, in arrival order, until its pong."""

    __slots__ = ("foreign", "ids", "index", "late", "pong_ns")

    def __init__(self) -> None:
        super().__init__()
        self.index = -1
        self.ids = array("i")
        self.foreign = 0
        self.late = 0  # frames after the pong: a server that reordered replay and pong
        self.pong_ns = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is not WSMsgType.TEXT:
            if msg_type is WSMsgType.CLOSE:
                transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        if payload == _PONG:
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


def _watch_worker(conn: Connection, url: str, phid: str, interval: float) -> None:
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
    conn.send(runner(_watch(conn, url, phid, interval)))
    conn.close()


async def _watch(conn: Connection, url: str, phid: str, interval: float) -> list[int]:
    _, tab = await asyncio.wait_for(
        ws_connect(_StormTab, url, use_aiofastnet=False, websocket_handshake_timeout=10.0), 10.0
    )
    assert isinstance(tab, _StormTab) and tab.transport is not None
    transport = tab.transport
    loop = asyncio.get_running_loop()
    transport.send(WSMsgType.TEXT, orjson.dumps({"command": "subscribe", "data": [phid]}))
    rtts: list[int] = []
    ready = False
    while not conn.poll():
        tab.pong = loop.create_future()
        start = time.monotonic_ns()
        transport.send(WSMsgType.TEXT, _PING)
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


def _check_replays(tabs: Sequence[_StormTab], expected: list[array], result: Result) -> None:
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
    stats = _PostStats()
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _post_range(opts, model, session, 0, len(model.messages), stats)
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
    _check_fd_budget(opts.sockets + 1)
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
    ticks0 = _cpu_ticks()
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
        args=(child, url, "PHID-USER-watcher000000000000", opts.watch_interval),
        daemon=True,
    )
    watcher.start()
    child.close()
    tabs: list[_StormTab] = []
    loop = asyncio.get_running_loop()
    try:
        if await _recv(parent, watcher, 30.0) != "ready":
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
                                _StormTab,
                                url,
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
                assert isinstance(tab, _StormTab) and tab.transport is not None
                tab.pong = loop.create_future()
                pongs.append(tab.pong)
                tabs.append(tab)
                tab.index = i
                send = tab.transport.send
                send(WSMsgType.TEXT, subscribe)
                send(WSMsgType.TEXT, _REPLAY)
                send(WSMsgType.TEXT, _PING)
                return
            raise ConnectionError(f"tab {i}: cannot connect to {url}: {last!r}")

        with _no_gc():
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
        rtts = sorted(await _recv(parent, watcher, 30.0))
        if rtts:
            result.watcher_pings = len(rtts)
            result.watcher_ping_p50_ms = _percentile(rtts, 0.50)
            result.watcher_ping_p99_ms = _percentile(rtts, 0.99)
            result.watcher_ping_max_ms = rtts[-1] / 1e6
        await asyncio.sleep(0.2)  # a frame sent after a pong would show up now
        _check_replays(tabs, expected, result)
    finally:
        await _close_tabs(tabs)
        parent.close()
        await loop.run_in_executor(None, watcher.join, 10.0)
        if watcher.is_alive():
            watcher.kill()
    ticks1 = _cpu_ticks()
    if ticks1[0] > ticks0[0]:
        result.steal_pct = (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) * 100
    return result


# -- the scenario -------------------------------------------------------------


def _percentile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
    return ordered[index] / 1e6


def _count(model: Model, tabs: Sequence[_Tab]) -> tuple[int, int]:
    """``(matched, unique)``: expected deliveries that arrived, and all distinct ones."""
    unique = sum(tab.seen.count(1) for tab in tabs)
    if model.reaches_all:
        return unique, unique
    matched = 0
    for m, group in enumerate(model.targets):
        for s in group:
            matched += tabs[s].seen[m]
    return matched, unique


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
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


async def run_scenario(opts: Options) -> Result:
    """Run one scenario against the server at ``opts``' URLs; see the module doc.

    Order: open and sync every tab; then per window: read the server's CPU,
    post the window's messages, wait for its last expected delivery (or
    ``deadline`` after its last answered post), read the CPU again. Then one
    more ping round so stragglers (duplicates, unexpected frames) are counted
    too; close the tabs; and, with their descriptors released, run the floor
    over the same number of sockets and the same windows.
    """
    if opts.scenario == "storm":
        return await run_storm(opts)
    _check_fd_budget(opts.sockets)
    model = build_model(opts)
    windows = split_windows(len(model.messages), opts.windows)
    result = Result(
        scenario=opts.scenario,
        sockets=opts.sockets,
        messages=len(model.messages),
        concurrency=None if opts.scenario == "idle" else effective_concurrency(opts),
        rate=opts.rate,
        windows=len(windows) if model.messages else 0,
        deliveries_expected=model.expected,
    )
    pid = opts.server_pid
    collector = _Collector(model.expected)
    rss_before = server_rss_bytes(pid) if pid else None

    t0 = time.perf_counter()
    tabs = await _open_tabs(opts, model, collector)
    result.connect_s = time.perf_counter() - t0
    ticks0 = _cpu_ticks()
    try:
        if opts.scenario == "idle":
            await asyncio.sleep(0.2)  # let the server finish logging the opens
            if pid and rss_before is not None:
                rss_after = server_rss_bytes(pid)
                result.rss_before_mb = rss_before / 2**20
                result.rss_after_mb = result.server_rss_mb = rss_after / 2**20
                result.bytes_per_socket = (rss_after - rss_before) / max(1, opts.sockets)
            return result
        with _no_gc():
            await _measure(opts, model, windows, tabs, collector, result)
    finally:
        await _close_tabs(tabs)

    if opts.floor and model.messages:
        payload = orjson.dumps(
            {**message_body(model, 0, time.monotonic_ns()), "touched": _FAKE_TOUCHED}
        )
        frame = ws_frame(payload)
        floor = await run_floor(
            opts.sockets, frame, None if model.reaches_all else model.targets, windows
        )
        result.frame_bytes = len(frame)
        result.floor_sends = floor.sends
        result.floor_cpu_per_send_us = floor.cpu_per_send_us
        result.window_floor_cpu_per_send_us = floor.window_cpu_per_send_us
        result.floor_loss_bytes = floor.bytes_expected - floor.bytes_received
        if result.server_cpu_per_delivery_us is not None and floor.cpu_per_send_us:
            result.ratio_to_floor = result.server_cpu_per_delivery_us / floor.cpu_per_send_us
        if result.server_cpu_per_message_us is not None and result.messages:
            per_message = result.deliveries_expected / result.messages
            result.overhead_per_message_us = (
                result.server_cpu_per_message_us - floor.cpu_per_send_us * per_message
            )
    ticks1 = _cpu_ticks()
    if ticks1[0] > ticks0[0]:
        result.steal_pct = (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) * 100
    return result


async def _warm_up(opts: Options, session: aiohttp.ClientSession) -> None:
    """Open every keep-alive admin connection with concurrent status reads.

    Otherwise the first window pays the TCP handshakes (and the server its
    accepts) of all ``concurrency`` connections: in a burst run that made the
    first window cost twice the others.
    """
    status_url = urlunsplit(urlsplit(opts.admin_url)._replace(path="/status/", query=""))

    async def read() -> None:
        with contextlib.suppress(Exception):
            async with session.get(status_url) as resp:
                await resp.read()

    await asyncio.gather(*(read() for _ in range(effective_concurrency(opts))))


async def _measure(
    opts: Options,
    model: Model,
    windows: list[tuple[int, int]],
    tabs: list[_Tab],
    collector: _Collector,
    result: Result,
) -> None:
    """Post window by window, wait for every delivery, and fill ``result``'s figures.

    Each window's server CPU is read on its own; the reported CPU per
    delivery and per message are medians over windows, so one burst of noise
    from a neighbour on a shared machine moves one window, not the figure.
    """
    pid = opts.server_pid
    stats = _PostStats()
    elapsed_ns = 0
    cpu_total = 0.0
    per_delivery: list[float] = []
    per_message: list[float] = []
    connector = aiohttp.TCPConnector(
        limit=effective_concurrency(opts), keepalive_timeout=60, force_close=False
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        await _warm_up(opts, session)
        gen0 = time.process_time()
        wanted = 0
        marks = []
        for first, stop in windows:
            expected = sum(len(model.targets[m]) for m in range(first, stop))
            wanted += expected
            collector.wanted = wanted
            if collector.received < wanted:
                collector.done.clear()
            cpu0 = server_cpu_seconds(pid) if pid else 0.0
            start_ns = time.monotonic_ns()
            await _post_range(opts, model, session, first, stop, stats)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collector.done.wait(), opts.deadline)
            end_ns = max(collector.last_ns, stats.done_ns)
            cpu = (server_cpu_seconds(pid) if pid else 0.0) - cpu0
            elapsed_ns += max(1, end_ns - start_ns)
            marks.append(len(collector.latencies))
            cpu_total += cpu
            if expected:
                per_delivery.append(cpu / expected * 1e6)
            per_message.append(cpu / (stop - first) * 1e6)
        result.generator_cpu_s = time.process_time() - gen0
    # Flush: anything the server sent before these pongs is now counted.
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await _sync_all(tabs, opts.deadline)

    matched, unique = _count(model, tabs)
    result.deliveries_received = matched
    result.loss = model.expected - matched
    result.unexpected = unique - matched
    result.duplicates = collector.duplicates
    result.foreign_frames = collector.foreign
    result.post_errors = stats.errors
    result.first_post_error = stats.first_error
    result.post_lag_max_ms = stats.lag_max_ns / 1e6
    elapsed = elapsed_ns / 1e9
    result.elapsed_s = elapsed
    result.msgs_per_s = result.messages / elapsed
    result.deliveries_per_s = matched / elapsed
    if collector.latencies:
        ordered = sorted(collector.latencies)
        result.latency_p50_ms = _percentile(ordered, 0.50)
        result.latency_p90_ms = _percentile(ordered, 0.90)
        result.latency_p99_ms = _percentile(ordered, 0.99)
        result.latency_max_ms = ordered[-1] / 1e6
        lower = 0
        for upper in marks:
            if upper > lower:
                window = sorted(collector.latencies[lower:upper])
                result.latency_p99_windows_ms.append(_percentile(window, 0.99))
            lower = upper
        if result.latency_p99_windows_ms:
            result.latency_p99_median_window_ms = _median(result.latency_p99_windows_ms)
    if pid:
        result.server_cpu_s = cpu_total
        result.window_server_cpu_per_delivery_us = per_delivery
        if per_delivery:
            result.server_cpu_per_delivery_us = _median(per_delivery)
        if per_message:
            result.server_cpu_per_message_us = _median(per_message)
        result.server_rss_mb = server_rss_bytes(pid) / 2**20
    if result.loss and collector.received < model.expected:
        result.notes.append(f"gave up waiting {opts.deadline:g}s after a window's last post")


# -- command line -------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="fastaphlict-bench",
        description=(
            "Load-test an Aphlict-compatible notification server (Aphlict, fastaphlict): "
            "open N WebSocket tabs, post messages as Phorge does, report throughput, "
            "loss, latency and (with --server-pid) the server's CPU per delivery and memory."
        ),
        epilog=(
            "scenarios: targeted = each tab on its user PHID and 5 object PHIDs, each "
            "message names 20 users and 1 object (~45 deliveries); broadcast = every tab on "
            "one PHID, every message to all; burst = broadcast posted --concurrency at a "
            "time; idle = connect and subscribe only, report server RSS per socket; "
            "storm = post --history messages, then every tab reconnects at once with "
            "subscribe (--phids-per-tab PHIDs), replay and ping, as JX.Aphlict does after a "
            "restart: server CPU per tab, time to the last pong, replays checked exactly, "
            "and a separate watcher tab's worst ping round trip."
        ),
    )
    parser.add_argument("--client-url", default=defaults.client_url, help="WebSocket URL")
    parser.add_argument("--admin-url", default=defaults.admin_url, help="admin HTTP URL")
    parser.add_argument("--instance", default=None, help="instance name (?instance= and /~name/)")
    parser.add_argument("--scenario", choices=SCENARIOS, default=defaults.scenario)
    parser.add_argument(
        "--sockets", type=int, default=None, help=f"tabs (default: storm {STORM_TABS}, else 1000)"
    )
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="messages/s; 0 = as fast as possible"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="posts in flight (default: burst 64, paced 32, else 1)",
    )
    parser.add_argument("--users", type=int, default=0, help="distinct users (default: sockets)")
    parser.add_argument(
        "--objects", type=int, default=0, help="distinct object PHIDs (default: sockets / 5)"
    )
    parser.add_argument("--server-pid", type=int, default=None, help="read its CPU and RSS")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain send() of the same frames (default: on)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=defaults.connect_concurrency,
        help=f"handshakes in flight (default: storm {STORM_CONNECT_CONCURRENCY}, else 100)",
    )
    parser.add_argument("--deadline", type=float, default=defaults.deadline)
    parser.add_argument(
        "--windows",
        type=int,
        default=defaults.windows,
        help="measure in this many slices of messages and report medians (default 1)",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=defaults.history,
        help="storm: messages posted before the storm (default 1000; 0 = empty history)",
    )
    parser.add_argument(
        "--phids-per-tab",
        type=int,
        default=defaults.phids_per_tab,
        help="storm: PHIDs per tab, its user and the rest objects (default 20)",
    )
    parser.add_argument(
        "--watch-interval",
        type=float,
        default=defaults.watch_interval,
        help="storm: seconds between the watcher tab's pings (default 0.005)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _print_human(result: Result) -> None:
    for key, value in result.as_dict().items():
        if value is None or value == []:
            continue
        print(f"{key:28} {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastaphlict-bench`` command; returns 0 for a clean run, 1 otherwise."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    opts = Options(
        client_url=args.client_url,
        admin_url=args.admin_url,
        instance=args.instance,
        scenario=args.scenario,
        sockets=args.sockets or (STORM_TABS if args.scenario == "storm" else Options().sockets),
        messages=args.messages,
        rate=args.rate,
        concurrency=args.concurrency,
        users=args.users,
        objects=args.objects,
        server_pid=args.server_pid,
        seed=args.seed,
        floor=args.floor,
        connect_concurrency=args.connect_concurrency,
        deadline=args.deadline,
        windows=args.windows,
        history=args.history,
        phids_per_tab=args.phids_per_tab,
        watch_interval=args.watch_interval,
    )
    try:
        result = run(opts)
    except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"fastaphlict-bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(result.as_dict()).decode())
    else:
        _print_human(result)
    return 0 if result.clean else 1


def run(opts: Options) -> Result:
    """:func:`run_scenario` on a fresh uvloop event loop (the sync entry point)."""
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but the generator works without it
        return asyncio.run(run_scenario(opts))
    return uvloop.run(run_scenario(opts))


if __name__ == "__main__":
    sys.exit(main())
