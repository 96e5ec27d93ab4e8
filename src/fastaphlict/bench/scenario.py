"""One steady-state scenario (targeted, broadcast, burst, idle), measured in windows.

``storm`` is dispatched to :mod:`fastaphlict.bench.storm`; ``broker``, which starts
its own servers and returns a pair of results, is run by :func:`fastaphlict.bench.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aiohttp
import orjson

from fastaphlict.bench.floor import run_floor
from fastaphlict.bench.model import (
    FAKE_TOUCHED,
    PHORGE_CONTENT_TYPE,
    Model,
    Options,
    Result,
    build_model,
    effective_concurrency,
    median,
    message_body,
    percentile,
    split_windows,
    ws_frame,
)
from fastaphlict.bench.posting import PostStats, post_range
from fastaphlict.bench.procfs import (
    check_fd_budget,
    cpu_ticks,
    server_cpu_seconds,
    server_rss_bytes,
)
from fastaphlict.bench.storm import run_storm
from fastaphlict.bench.tabs import (
    Collector,
    Tab,
    admin_post_url,
    close_tabs,
    no_gc,
    open_tabs,
    sync_all,
)

# -- the scenario -------------------------------------------------------------


def count_deliveries(model: Model, tabs: Sequence[Tab]) -> tuple[int, int]:
    """``(matched, unique)``: expected deliveries that arrived, and all distinct ones."""
    unique = sum(tab.seen.count(1) for tab in tabs)
    if model.reaches_all:
        return unique, unique
    matched = 0
    for m, group in enumerate(model.targets):
        for s in group:
            matched += tabs[s].seen[m]
    return matched, unique


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
    if opts.scenario == "broker":
        raise RuntimeError("the broker scenario starts its own servers: run it with run()")
    check_fd_budget(opts.sockets)
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
    collector = Collector(model.expected)
    rss_before = server_rss_bytes(pid) if pid else None

    t0 = time.perf_counter()
    tabs = await open_tabs(opts, model, collector)
    result.connect_s = time.perf_counter() - t0
    ticks0 = cpu_ticks()
    try:
        if opts.scenario == "idle":
            await asyncio.sleep(0.2)  # let the server finish logging the opens
            if pid and rss_before is not None:
                rss_after = server_rss_bytes(pid)
                result.rss_before_mb = rss_before / 2**20
                result.rss_after_mb = result.server_rss_mb = rss_after / 2**20
                result.bytes_per_socket = (rss_after - rss_before) / max(1, opts.sockets)
            return result
        with no_gc():
            await _measure(opts, model, windows, tabs, collector, result)
    finally:
        await close_tabs(tabs)

    if opts.floor and model.messages:
        payload = orjson.dumps(
            {**message_body(model, 0, time.monotonic_ns()), "touched": FAKE_TOUCHED}
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
    ticks1 = cpu_ticks()
    if ticks1[0] > ticks0[0]:
        result.steal_pct = (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) * 100
    return result


#: What the warm-up posts: a type no browser acts on, for nobody (it is stored
#: in the history and reaches no socket, as Phorge's own empty posts do).
WARM_UP = orjson.dumps({"type": "fastaphlict.bench.warm-up", "subscribers": []})


async def warm_up(opts: Options, session: aiohttp.ClientSession) -> None:
    """Open every keep-alive admin connection with concurrent posts, as Phorge's are.

    Otherwise the first window pays the TCP handshakes (and the server its
    accepts) of all ``concurrency`` connections: in a burst run that made the
    first window cost twice the others. The connections are opened with a
    ``POST /`` rather than a status read: a server may serve Phorge's posts
    on a path of its own and leave any other first request to a general HTTP
    stack for the rest of the connection (fastaphlict does), and the
    measured posts must take the path Phorge's take.
    """
    url = admin_post_url(opts)
    headers = {"Content-Type": PHORGE_CONTENT_TYPE}

    async def post() -> None:
        with contextlib.suppress(Exception):
            async with session.post(url, data=WARM_UP, headers=headers) as resp:
                await resp.read()

    await asyncio.gather(*(post() for _ in range(effective_concurrency(opts))))


async def _measure(
    opts: Options,
    model: Model,
    windows: list[tuple[int, int]],
    tabs: list[Tab],
    collector: Collector,
    result: Result,
) -> None:
    """Post window by window, wait for every delivery, and fill ``result``'s figures.

    Each window's server CPU is read on its own; the reported CPU per
    delivery and per message are medians over windows, so one burst of noise
    from a neighbour on a shared machine moves one window, not the figure.
    """
    pid = opts.server_pid
    stats = PostStats()
    elapsed_ns = 0
    cpu_total = 0.0
    per_delivery: list[float] = []
    per_message: list[float] = []
    connector = aiohttp.TCPConnector(
        limit=effective_concurrency(opts), keepalive_timeout=60, force_close=False
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        await warm_up(opts, session)
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
            await post_range(opts, model, session, first, stop, stats)
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
        await sync_all(tabs, opts.deadline)

    matched, unique = count_deliveries(model, tabs)
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
        result.latency_p50_ms = percentile(ordered, 0.50)
        result.latency_p90_ms = percentile(ordered, 0.90)
        result.latency_p99_ms = percentile(ordered, 0.99)
        result.latency_max_ms = ordered[-1] / 1e6
        lower = 0
        for upper in marks:
            if upper > lower:
                window = sorted(collector.latencies[lower:upper])
                result.latency_p99_windows_ms.append(percentile(window, 0.99))
            lower = upper
        if result.latency_p99_windows_ms:
            result.latency_p99_median_window_ms = median(result.latency_p99_windows_ms)
    if pid:
        result.server_cpu_s = cpu_total
        result.window_server_cpu_per_delivery_us = per_delivery
        if per_delivery:
            result.server_cpu_per_delivery_us = median(per_delivery)
        if per_message:
            result.server_cpu_per_message_us = median(per_message)
        result.server_rss_mb = server_rss_bytes(pid) / 2**20
    if result.loss and collector.received < model.expected:
        result.notes.append(f"gave up waiting {opts.deadline:g}s after a window's last post")
