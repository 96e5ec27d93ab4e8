"""The ``broker`` scenario: a two-node cluster on Redis, side by side with one node without it.

Issue 11 asks what the Redis broker costs: tabs spread over two nodes, posts
to one, against the same tabs on a single node. Both set-ups are started
here (see :mod:`fastaphlict.bench.nodes`): a ``redis-server``, nodes A and B
with ``--broker``, and node S without one. The targeted mix is built once;
tab ``i`` of the model opens on A when ``i`` is even and on B when odd, and
a second copy of every tab opens on S. Both sets stay open for the whole
run, so the two set-ups hold the same subscriptions, receive the same
messages and cost the generator the same work per delivery.

The messages are posted in windows, alternating which set-up goes first
(cluster then single, single then cluster, ...), so a neighbour's burst or
a drift of the machine falls on both. Per window, as in the steady-state
scenarios: CPU read right before the first post and right after the last
expected delivery; for the cluster, A's and B's CPU summed and Redis' apart.
Figures are medians over windows; latency is per delivery, from the post's
``sent`` to the frame's arrival, reported for the cluster overall, for A's
tabs (local: delivered as the post is handled) and for B's (remote: through
Redis). Loss is exact: every tab of both set-ups checks what it saw against
the model.

What it does not measure: a second machine. All five processes (generator,
A, B, S, Redis) share this machine's cores, so the cluster's extra process
hops also compete for CPU with the generator; on two cores that is part of
what the latency figures show.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import orjson

from fastaphlict.bench.model import (
    PHORGE_CONTENT_TYPE,
    BrokerResult,
    Model,
    Options,
    Result,
    build_model,
    effective_concurrency,
    median,
    percentile,
    split_windows,
)
from fastaphlict.bench.nodes import Child, start_nodes, start_redis, stop_all
from fastaphlict.bench.posting import PostStats, post_range
from fastaphlict.bench.procfs import (
    check_fd_budget,
    cpu_ticks,
    server_cpu_seconds,
    server_rss_bytes,
)
from fastaphlict.bench.scenario import count_deliveries, warm_up
from fastaphlict.bench.tabs import (
    Collector,
    Tab,
    admin_post_url,
    close_tabs,
    no_gc,
    open_tabs,
    sync_all,
)

#: Posts to a PHID no tab holds, before measuring: they open the broker's
#: Redis connections and load its script, on both set-ups alike.
WARM_UP_POSTS = 20
WARM_UP_PHID = "PHID-WARM-00000000000000000000"


def split_model(model: Model, remote_every: int = 2) -> list[Model]:
    """Tab ``i`` goes to B when ``i % remote_every == remote_every - 1``, else to A.

    Each part's targets are in its own tab numbering. The default (every
    second tab on B) is the cluster as deployed; a large ``remote_every``
    puts nearly every tab on A, which leaves B with only the broker's own
    work, separating the broker's cost from that of splitting tabs.
    """

    def part(s: int) -> int:
        return 1 if s % remote_every == remote_every - 1 else 0

    out = []
    for p in (0, 1):
        members = [s for s in range(len(model.subscriptions)) if part(s) == p]
        local = {s: k for k, s in enumerate(members)}
        targets = [[local[s] for s in group if part(s) == p] for group in model.targets]
        out.append(Model([model.subscriptions[s] for s in members], model.messages, targets))
    return out


@dataclass
class _Group:
    """The tabs one node holds: their slice of the model, their collector, the tabs."""

    label: str
    node: Child
    model: Model
    collector: Collector
    tabs: list[Tab] = field(default_factory=list)
    wanted: int = 0


@dataclass
class _SetUp:
    """One set-up under test: where its posts go, whose CPU counts, what it measured."""

    result: Result
    opts: Options
    nodes: list[Child]
    groups: list[_Group]
    redis: Child | None = None
    stats: PostStats = field(default_factory=PostStats)
    elapsed_ns: int = 0
    cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    per_delivery: list[float] = field(default_factory=list)
    per_message: list[float] = field(default_factory=list)
    redis_per_delivery: list[float] = field(default_factory=list)
    #: Per window, each node's CPU per delivery.
    node_per_delivery: list[list[float]] = field(default_factory=list)
    #: Per window, how many latencies each group had recorded by its end.
    marks: list[list[int]] = field(default_factory=list)

    def cpu(self) -> tuple[list[float], float]:
        """CPU seconds so far: each node's, and Redis' (0 without one)."""
        nodes = [server_cpu_seconds(n.pid) for n in self.nodes]
        return nodes, server_cpu_seconds(self.redis.pid) if self.redis else 0.0


async def run_broker(opts: Options, workdir: Path | None = None) -> BrokerResult:
    """Start Redis and the three nodes, measure both set-ups, stop everything.

    ``workdir`` keeps the processes' logs (a temporary directory otherwise).
    """
    check_fd_budget(2 * opts.sockets)  # both sets of tabs are open at once
    with tempfile.TemporaryDirectory(prefix="fastaphlict-bench-") as tmp:
        directory = workdir or Path(tmp)
        children: list[Child] = []
        try:
            redis = start_redis(directory / "redis")
            children.append(redis)
            url = (
                f"unix://{directory / 'redis' / 'redis.sock'}"
                if opts.broker_transport == "unix"
                else f"redis://127.0.0.1:{redis.port}/0"
            )
            a, b, single = start_nodes(
                directory, [("node-a", url), ("node-b", url), ("single", None)]
            )
            children += [a, b, single]
            result = await _compare(opts, redis, a, b, single)
            problems = [line for child in children for line in child.problems()]
            result.broker.notes += problems[:10]
            return result
        finally:
            stop_all(children)


async def _compare(opts: Options, redis: Child, a: Child, b: Child, single: Child) -> BrokerResult:
    model = build_model(opts)
    windows = split_windows(len(model.messages), opts.windows)
    local, remote = split_model(model, opts.broker_remote_every)
    cluster = _SetUp(
        _empty_result(opts, "broker", model, len(windows)),
        replace(opts, admin_url=a.admin_url),
        [a, b],
        [
            _Group("local", a, local, Collector(local.expected)),
            _Group("remote", b, remote, Collector(remote.expected)),
        ],
        redis,
    )
    alone = _SetUp(
        _empty_result(opts, "single", model, len(windows)),
        replace(opts, admin_url=single.admin_url),
        [single],
        [_Group("all", single, model, Collector(model.expected))],
    )
    setups = (cluster, alone)
    ticks0 = cpu_ticks()
    try:
        for setup in setups:
            t0 = time.perf_counter()
            for group in setup.groups:
                group_opts = replace(
                    opts, client_url=group.node.client_url, sockets=len(group.model.subscriptions)
                )
                group.tabs = await open_tabs(group_opts, group.model, group.collector)
            setup.result.connect_s = time.perf_counter() - t0
        with no_gc():
            await _measure(opts, model, windows, setups)
    finally:
        await close_tabs([tab for setup in setups for g in setup.groups for tab in g.tabs])
    ticks1 = cpu_ticks()
    if ticks1[0] > ticks0[0]:
        steal = (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) * 100
        cluster.result.steal_pct = alone.result.steal_pct = steal
    return BrokerResult(cluster.result, alone.result)


def _empty_result(opts: Options, name: str, model: Model, windows: int) -> Result:
    return Result(
        scenario=name,
        sockets=opts.sockets,
        messages=len(model.messages),
        concurrency=effective_concurrency(opts),
        rate=opts.rate,
        windows=windows,
        deliveries_expected=model.expected,
    )


async def _warm_up_posts(setup: _SetUp, session: aiohttp.ClientSession) -> None:
    """A few posts that reach no tab: the broker's connections and script are ready after."""
    url = admin_post_url(setup.opts)
    headers = {"Content-Type": PHORGE_CONTENT_TYPE}
    for i in range(WARM_UP_POSTS):
        body = {"key": f"warm-up-{i}", "type": "notification", "subscribers": [WARM_UP_PHID]}
        with contextlib.suppress(aiohttp.ClientError):
            async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                await resp.read()
    await asyncio.sleep(0.2)  # the broker publishes behind the answer


async def _measure(
    opts: Options, model: Model, windows: list[tuple[int, int]], setups: tuple[_SetUp, ...]
) -> None:
    """Post every window to each set-up in turn (alternating first), then fill the results."""
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for setup in setups:
            connector = aiohttp.TCPConnector(
                limit=effective_concurrency(opts), keepalive_timeout=60, force_close=False
            )
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            await warm_up(setup.opts, session)
            await _warm_up_posts(setup, session)
            sessions.append(session)
        pairs = list(zip(setups, sessions, strict=True))
        for k, (first, stop) in enumerate(windows):
            for setup, session in pairs if k % 2 == 0 else pairs[::-1]:
                gen0 = time.process_time()
                await _window(opts, model, setup, session, first, stop)
                setup.result.generator_cpu_s += time.process_time() - gen0
    for setup in setups:
        await _finish(opts, setup)


async def _window(
    opts: Options,
    model: Model,
    setup: _SetUp,
    session: aiohttp.ClientSession,
    first: int,
    stop: int,
) -> None:
    """Post messages ``first`` to ``stop - 1`` to one set-up; wait for every delivery."""
    expected = 0
    for group in setup.groups:
        count = sum(len(group.model.targets[m]) for m in range(first, stop))
        expected += count
        group.wanted += count
        group.collector.wanted = group.wanted
        if group.collector.received < group.wanted:
            group.collector.done.clear()
    nodes0, redis0 = setup.cpu()
    start_ns = time.monotonic_ns()
    await post_range(setup.opts, model, session, first, stop, setup.stats)
    with contextlib.suppress(asyncio.TimeoutError):
        waits = [group.collector.done.wait() for group in setup.groups]
        await asyncio.wait_for(asyncio.gather(*waits), opts.deadline)
    end_ns = max(setup.stats.done_ns, *(g.collector.last_ns for g in setup.groups))
    nodes1, redis1 = setup.cpu()
    per_node = [after - before for before, after in zip(nodes0, nodes1, strict=True)]
    cpu = sum(per_node)
    setup.elapsed_ns += max(1, end_ns - start_ns)
    setup.cpu_s += cpu
    setup.redis_cpu_s += redis1 - redis0
    setup.marks.append([len(g.collector.latencies) for g in setup.groups])
    if expected:
        setup.per_delivery.append(cpu / expected * 1e6)
        setup.redis_per_delivery.append((redis1 - redis0) / expected * 1e6)
        setup.node_per_delivery.append([c / expected * 1e6 for c in per_node])
    setup.per_message.append(cpu / (stop - first) * 1e6)


async def _finish(opts: Options, setup: _SetUp) -> None:
    """Flush every tab with a ping round, count deliveries exactly, compute the figures."""
    result = setup.result
    matched = unique = 0
    for group in setup.groups:
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await sync_all(group.tabs, opts.deadline)
        got, distinct = count_deliveries(group.model, group.tabs)
        matched += got
        unique += distinct
        result.duplicates += group.collector.duplicates
        result.foreign_frames += group.collector.foreign
    result.deliveries_received = matched
    result.loss = result.deliveries_expected - matched
    result.unexpected = unique - matched
    result.post_errors = setup.stats.errors
    result.first_post_error = setup.stats.first_error
    result.post_lag_max_ms = setup.stats.lag_max_ns / 1e6
    result.elapsed_s = setup.elapsed_ns / 1e9
    result.msgs_per_s = result.messages / result.elapsed_s
    result.deliveries_per_s = matched / result.elapsed_s
    _latencies(setup)
    result.server_cpu_s = setup.cpu_s
    result.window_server_cpu_per_delivery_us = setup.per_delivery
    if setup.per_delivery:
        result.server_cpu_per_delivery_us = median(setup.per_delivery)
    if setup.per_message:
        result.server_cpu_per_message_us = median(setup.per_message)
    if setup.node_per_delivery and len(setup.nodes) > 1:
        result.node_cpu_per_delivery_us = [
            median([window[n] for window in setup.node_per_delivery])
            for n in range(len(setup.nodes))
        ]
    if setup.redis is not None:
        result.redis_cpu_s = setup.redis_cpu_s
        if setup.redis_per_delivery:
            result.redis_cpu_per_delivery_us = median(setup.redis_per_delivery)
    result.server_rss_mb = sum(server_rss_bytes(n.pid) for n in setup.nodes) / 2**20
    if result.loss:
        result.notes.append(f"gave up waiting {opts.deadline:g}s after a window's last post")


def _latencies(setup: _SetUp) -> None:
    """Overall, per group (local and remote) and per-window p99 latencies into the result."""
    result = setup.result
    every = array("q")
    for group in setup.groups:
        every.extend(group.collector.latencies)
        ordered = sorted(group.collector.latencies)
        if ordered and group.label == "local":
            result.latency_local_p50_ms = percentile(ordered, 0.50)
            result.latency_local_p99_ms = percentile(ordered, 0.99)
        elif ordered and group.label == "remote":
            result.latency_remote_p50_ms = percentile(ordered, 0.50)
            result.latency_remote_p99_ms = percentile(ordered, 0.99)
    if not every:
        return
    ordered = sorted(every)
    result.latency_p50_ms = percentile(ordered, 0.50)
    result.latency_p90_ms = percentile(ordered, 0.90)
    result.latency_p99_ms = percentile(ordered, 0.99)
    result.latency_max_ms = ordered[-1] / 1e6
    lower = [0] * len(setup.groups)
    for upper in setup.marks:
        window: list[int] = []
        for g, group in enumerate(setup.groups):
            window.extend(group.collector.latencies[lower[g] : upper[g]])
        if window:
            result.latency_p99_windows_ms.append(percentile(sorted(window), 0.99))
        lower = upper
    if result.latency_p99_windows_ms:
        result.latency_p99_median_window_ms = median(result.latency_p99_windows_ms)
