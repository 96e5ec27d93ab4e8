"""The test helpers' own rules: cancellation passes through, time bounds scale, CI runs all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import support
from support import assert_cancelled_promptly, cancel_and_wait, require, scaled

TESTS = Path(__file__).resolve().parent


async def test_cancel_and_wait_passes_on_a_cancellation_aimed_at_its_caller() -> None:
    """The caller is cancelled while its child is still cleaning up: it must end too."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def child() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a slow clean-up, as a closing handshake is

    async def caller() -> None:
        await started.wait()
        await cancel_and_wait(worker)
        await asyncio.Event().wait()  # where a swallowed cancellation leads: forever

    worker = asyncio.create_task(child())
    parent = asyncio.create_task(caller())
    await started.wait()
    await asyncio.sleep(0.01)  # the parent now waits for the child's clean-up
    assert not parent.done()
    await assert_cancelled_promptly(parent, then=release.set)
    await asyncio.wait([worker], timeout=scaled(1.0))
    assert worker.cancelled()


async def test_cancel_and_wait_leaves_the_childs_failure_on_the_child() -> None:
    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("clean-up failed")

    worker = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await cancel_and_wait(worker)
    with pytest.raises(RuntimeError, match="clean-up failed"):
        worker.result()


async def test_cancel_and_wait_of_nothing_returns() -> None:
    await asyncio.wait_for(cancel_and_wait(), scaled(1.0))


def test_scaled_multiplies_by_the_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "TIMEOUT_FACTOR", 2.5)
    assert scaled(4.0) == 10.0
    monkeypatch.setattr(support, "TIMEOUT_FACTOR", 1.0)
    assert scaled(4.0) == 4.0


def _factor_in_child(value: str | None) -> subprocess.CompletedProcess[str]:
    """Import ``support`` afresh under ``FASTAPHLICT_TESTS_TIMEOUT_FACTOR=value``."""
    env = {k: v for k, v in os.environ.items() if k != "FASTAPHLICT_TESTS_TIMEOUT_FACTOR"}
    if value is not None:
        env["FASTAPHLICT_TESTS_TIMEOUT_FACTOR"] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    code = "import support; print(support.TIMEOUT_FACTOR, support.TIMEOUT, support.scaled(2))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=scaled(30)
    )


@pytest.mark.parametrize(
    ("value", "printed"),
    [(None, "1.0 5.0 2.0"), ("", "1.0 5.0 2.0"), ("3", "3.0 15.0 6.0"), ("0.5", "0.5 2.5 1.0")],
)
def test_the_factor_is_read_from_the_environment(value: str | None, printed: str) -> None:
    done = _factor_in_child(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == printed.split()


@pytest.mark.parametrize("value", ["fast", "0", "-2", "inf", "nan"])
def test_a_bad_factor_is_refused(value: str) -> None:
    done = _factor_in_child(value)
    assert done.returncode != 0
    assert "FASTAPHLICT_TESTS_TIMEOUT_FACTOR must be a positive number" in done.stderr


@pytest.mark.timeout(7)
def test_timeout_marks_are_scaled(request: pytest.FixtureRequest) -> None:
    mark = request.node.get_closest_marker("timeout")
    assert mark is not None and mark.args[0] == scaled(7)


async def test_a_stuck_async_test_fails_with_where_it_waited() -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    with pytest.raises(AssertionError, match=r"still running after .* at stuck .* > wait"):
        await support._bounded(stuck, 0.05)()


async def test_a_timeout_the_test_raises_itself_stays_a_timeout() -> None:
    async def times_out() -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    with pytest.raises(asyncio.TimeoutError):
        await support._bounded(times_out, 5.0)()


async def test_a_cancelled_child_that_will_not_end_fails_the_caller() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # swallows its cancellation, as the bug class does

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    try:
        with pytest.raises(AssertionError, match="after cancellation"):
            await cancel_and_wait(task, within=0.1)
    finally:
        release.set()
        task.cancel()
        await asyncio.wait([task])


_REPORT_PLUGIN = """
def pytest_collection_finish(session):
    option = session.config.option
    print("benchmark_only", getattr(option, "benchmark_only", None))
    print("roots", sorted({item.nodeid.split("/")[0] for item in session.items}))
"""


def _collect(tmp_path: Path, *args: str) -> str:
    """``python -m pytest --collect-only ARGS`` from the project root, as a developer types it."""
    (tmp_path / "report_plugin.py").write_text(_REPORT_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "report_plugin", *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_pytest_benchmark_collects_the_benchmarks_and_plain_pytest_the_tests(
    tmp_path: Path,
) -> None:
    out = _collect(tmp_path, "--benchmark", "-p", "no:cacheprovider")
    assert "benchmark_only True" in out
    assert "roots ['benchmarks']" in out
    out = _collect(tmp_path, "-p", "no:cacheprovider")
    assert "benchmark_only False" in out, "the README's test command is unchanged"
    assert "roots ['tests']" in out


@pytest.mark.parametrize("ci", [None, "", "0", "false", "False"])
def test_require_skips_a_developer_without_the_program(
    monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    require(True, "present", "the test")
    with pytest.raises(pytest.skip.Exception, match=r"^redis-server is missing$"):
        require(False, "redis-server is missing", "the Redis tests")


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_require_fails_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    require(True, "present", "the test")
    with pytest.raises(pytest.fail.Exception, match="CI is set, so the Redis tests must run"):
        require(False, "redis-server is missing", "the Redis tests")


def test_no_test_module_imports_another() -> None:
    """What tests share lives in the support modules; a test module is never imported."""
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, offenders
