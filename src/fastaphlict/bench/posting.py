"""Posting as Phorge does: raw JSON under the form content type, paced or as fast as answered."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson

from fastaphlict.bench.model import (
    PHORGE_CONTENT_TYPE,
    Model,
    Options,
    effective_concurrency,
    message_body,
)
from fastaphlict.bench.tabs import admin_post_url

# -- posting ------------------------------------------------------------------


@dataclass
class PostStats:
    errors: int = 0
    first_error: str | None = None
    lag_max_ns: int = 0
    done_ns: int = 0


async def post_range(
    opts: Options,
    model: Model,
    session: aiohttp.ClientSession,
    first: int,
    stop: int,
    stats: PostStats,
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
