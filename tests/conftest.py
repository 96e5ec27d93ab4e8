"""Shared test set-up: uvloop for asyncio tests, scaled time limits, hypothesis under CI.

- Every asyncio test runs on uvloop, as production does.
- pytest-timeout's limits (the ``timeout`` of pyproject.toml and every
  ``timeout`` mark) are multiplied by ``FASTAPHLICT_TESTS_TIMEOUT_FACTOR``,
  like every other bound (see ``support.py``), and every asyncio test is
  cancelled at 0.9 of its limit, so a stuck await fails with its traceback
  instead of hanging the suite (``support.bound_async_tests``).
- ``redis_server`` is a real ``redis-server`` of the test's own, started on a
  free port in the test's ``tmp_path`` and stopped afterwards
  (``redis_support.RedisServer``); without ``redis-server`` the test skips,
  or fails under ``CI``.
- With ``CI`` set (CI sets ``CI=true``) hypothesis runs the "ci" profile:
  derandomized, so a red build is the same build when run again, and with the
  blob to reproduce a failure printed. Developers keep the default profile
  and its random exploration. The profile is loaded here, before any test
  module builds its ``settings(...)``: those inherit what they don't set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import settings

import support
from redis_support import RedisServer, require_redis

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    support.scale_timeout_option(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    support.scale_timeout_marks(items)
    support.bound_async_tests(config, items)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` (append-only, no password) in ``tmp_path/redis``."""
    require_redis()
    with RedisServer(tmp_path / "redis") as server:
        yield server
