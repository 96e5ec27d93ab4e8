"""Micro-benchmarks of the compiled fan-out module (no network).

Run: ``python -m pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Iterator

import pytest
from picows import WSTransport

from fastaphlict._fanout import Channel, build_frame

LISTENERS = 10_000
OBJECTS = 2_000


class _Transport:
    """Enough of an asyncio transport for picows' WSTransport to be built."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        raise AssertionError("matching must not write")


@pytest.fixture(scope="module")
def index() -> Iterator[tuple[Channel, list]]:
    """10000 listeners, each on its user PHID and 5 of 2000 object PHIDs."""
    loop = asyncio.new_event_loop()
    a, b = socket.socketpair()
    rng = random.Random(1)
    channel = Channel()
    subs = []
    log = logging.getLogger("bench")
    for i in range(LISTENERS):
        sub = channel.attach(WSTransport(False, _Transport(a), log, loop))
        channel.subscribe(
            sub, [f"PHID-USER-{i}", *(f"PHID-TASK-{rng.randrange(OBJECTS)}" for _ in range(5))]
        )
        subs.append(sub)
    yield channel, subs
    a.close()
    b.close()
    loop.close()


def test_match_21_phids_against_10000_listeners(benchmark, index) -> None:
    channel, _ = index
    rng = random.Random(2)
    message = [f"PHID-USER-{rng.randrange(LISTENERS)}" for _ in range(20)] + ["PHID-TASK-7"]
    targets = benchmark(channel.match, message)
    assert len(targets) >= 20


@pytest.mark.parametrize("size", [260, 4096])
def test_build_frame(benchmark, size: int) -> None:
    payload = b"x" * size
    frame = benchmark(build_frame, payload)
    assert len(frame) > size


def test_subscribe_unsubscribe_churn(benchmark, index) -> None:
    channel, subs = index
    sub = subs[0]
    phids = [f"PHID-CHURN-{i}" for i in range(10)]

    def churn() -> None:
        channel.subscribe(sub, phids)
        channel.unsubscribe(sub, phids)

    benchmark(churn)
    assert not (sub.phids & set(phids))
