"""The long soak: minutes of churn around stable tabs, against a real server process.

The same run as ``tests/test_soak.py`` (its module holds the engine and the
verdict), longer and wider: 100 stable tabs, two dozen churning tasks, 200
posts per second, a 30 s warm-up so the history (60 s, 4096 entries) is
nearly full before the baseline is read, then three minutes measured. It
asserts zero loss for every tab subscribed through a message's flight, no
stray delivery, open files back to the baseline, RSS growth under the bound,
and a clean server log. ``FASTAPHLICT_BENCH_QUICK=1`` shrinks it to ~5 s.

Run: ``python -m pytest benchmarks/test_soak_long.py --benchmark-only -s``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop

QUICK = os.environ.get("FASTAPHLICT_BENCH_QUICK", "").lower() not in ("", "0", "false", "no")

pytestmark = pytest.mark.timeout(600)


def _engine() -> Any:
    """``tests/test_soak.py``, loaded by path: kept apart from this module."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    path = tests / "test_soak.py"
    name = "fastaphlict_soak_engine"
    if str(tests) not in sys.path:
        sys.path.append(str(tests))  # the engine imports the tests' support module
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


engine = _engine()

OPTIONS = (
    engine.SoakOptions(duration=4.0, warmup=1.0)
    if QUICK
    else engine.SoakOptions(duration=180.0, warmup=30.0, stable=100, churners=24, rate=200.0)
)


def test_soak(benchmark: Any, record: Any, tmp_path: Path) -> None:
    """Churn for minutes: nothing lost, nothing stray, no open file or memory left behind."""
    with engine.soak_server(tmp_path / "server.log") as server:
        results: list[Any] = []
        benchmark.pedantic(
            lambda: results.append(uvloop.run(engine.soak(server, OPTIONS))),
            rounds=1,
            iterations=1,
        )
        (result,) = results
        print(engine.summary(result))
        row = {"name": "soak", **result.as_dict()}
        benchmark.extra_info.update(row)
        record(
            {
                "name": "soak",
                "sockets": OPTIONS.stable,
                "messages": result.messages,
                "loss": len(result.problems),
                "server_rss_mb": result.rss_after / 2**20,
            }
        )
        engine.check(server, result)
