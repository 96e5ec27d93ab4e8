"""Micro-benchmarks of replay selection (no network): what a replay costs the loop.

The issue's bar: a tab with 4096 subscriptions replaying a full history (4096
entries, 21 subscribers each) must cost well under 10 ms of loop time. (The
replaced way compared every subscription with every entry's subscribers:
about 2 ms for one 20-PHID tab against 1000 entries, seconds for 4096 PHIDs.)

Run: ``python -m pytest benchmarks/test_micro_replay.py --benchmark-only``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from fastaphlict._history import History

ENTRIES = 4096
SUBSCRIBERS = 21
USERS = 20_000
OBJECTS = 2_000
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def full() -> Iterator[tuple[History, list[list[str]]]]:
    """A busy minute: 4096 feed stories, each to 20 users and one object."""
    rng = random.Random(1)
    history = History()
    lists = []
    for n in range(ENTRIES):
        subscribers = [f"PHID-USER-{u:020d}" for u in rng.sample(range(USERS), SUBSCRIBERS - 1)]
        subscribers.append(f"PHID-TASK-{rng.randrange(OBJECTS):020d}")
        history.add(NOW - 30_000 + n, subscribers, b"x" * 300)
        lists.append(subscribers)
    yield history, lists


def _tab(rng: random.Random) -> list[str]:
    """A Phorge tab: its user and 19 objects."""
    return [f"PHID-USER-{rng.randrange(USERS):020d}"] + [
        f"PHID-TASK-{rng.randrange(OBJECTS):020d}" for _ in range(19)
    ]


def test_replay_select_tab_of_20(benchmark, full) -> None:
    history, _ = full
    tab = _tab(random.Random(2))
    frames = benchmark(history.select, tab, NOW, 60_000.0)
    benchmark.extra_info["frames"] = len(frames)


def test_replay_select_4096_strangers(benchmark, full) -> None:
    history, _ = full
    phids = [f"PHID-NONE-{i:020d}" for i in range(4096)]
    assert benchmark(history.select, phids, NOW, 60_000.0) == []


def test_replay_select_4096_matching_everything(benchmark, full) -> None:
    history, lists = full
    phids = sorted({phid for subscribers in lists for phid in subscribers})[:4096]
    frames = benchmark(history.select, phids, NOW, 60_000.0)
    benchmark.extra_info["frames"] = len(frames)
