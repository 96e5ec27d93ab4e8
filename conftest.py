"""Root of the project's pytest runs: ``pytest --benchmark`` runs the benchmark suite.

The project's description promises that command. The plain ``python -m
pytest`` still collects ``tests/`` only (``testpaths``); ``--benchmark``
collects ``benchmarks/`` instead, as ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        help="run the benchmark suite (benchmarks/, --benchmark-only) instead of the tests",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Swap the default paths for ``benchmarks/``, before pytest-benchmark reads its options."""
    if not config.getoption("benchmark"):
        return
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [str(BENCHMARKS)]
    option = config.option
    # --benchmark-disable (the quick CI check) and --benchmark-skip keep their meaning.
    if not (
        getattr(option, "benchmark_disable", False) or getattr(option, "benchmark_skip", False)
    ):
        option.benchmark_only = True
