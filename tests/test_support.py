"""The test helpers' own rules: cancellation passes through, time bounds scale, CI runs all."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import support
from redis_support import RedisServer
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


#: The tests that build a bare ``Server`` because they are about the object itself,
#: by (module, test): its ``serve()`` failing part way, and the embedding signature of
#: before Settings.
BARE_SERVER_ALLOWED = {
    ("test_server.py", "test_a_failed_start_closes_listeners_and_the_peer_session"),
    ("test_server.py", "test_a_server_built_the_old_way_from_a_config_and_keywords_still_serves"),
}


def other_ways_to_start(name: str, source: str) -> list[str]:
    """Where module ``name`` starts a fastaphlict server other than by support's run or spawn.

    A bare ``Server(...)`` outside :data:`BARE_SERVER_ALLOWED`, a subclass of
    ``ServerProcess``, or a ``Popen`` in a function that names ``fastaphlict``
    as a command word (``[sys.executable, "-m", "fastaphlict", ...]``).
    """
    import ast

    def called(node: ast.AST, what: str) -> bool:
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        return (isinstance(func, ast.Name) and func.id == what) or (
            isinstance(func, ast.Attribute) and func.attr == what
        )

    def named(node: ast.expr) -> str:
        return node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")

    def commands_fastaphlict(scope: ast.AST) -> bool:
        return any(
            isinstance(element, ast.Constant) and element.value == "fastaphlict"
            for node in ast.walk(scope)
            if isinstance(node, (ast.List, ast.Tuple))
            for element in node.elts
        )

    found = []
    tree = ast.parse(source)
    scopes: list[tuple[str, ast.AST]] = [("<module>", tree)]
    scopes += [
        (node.name, node)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and "ServerProcess" in map(named, node.bases):
            found.append(f"{name}: class {node.name}(ServerProcess)")
    for scope_name, scope in scopes:
        # Only what the scope holds itself: a nested function is a scope of its own.
        own = [scope]
        calls = []
        while own:
            for child in ast.iter_child_nodes(own.pop()):
                if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    own.append(child)
                    calls.append(child)
        for node in calls:
            if called(node, "Server") and (name, scope_name) not in BARE_SERVER_ALLOWED:
                found.append(f"{name}: Server(...) in {scope_name}")
            if called(node, "Popen") and commands_fastaphlict(scope):
                found.append(f"{name}: Popen of fastaphlict in {scope_name}")
    return found


def test_the_guard_finds_every_other_way_to_start_a_server() -> None:
    source = """
import subprocess, sys
from fastaphlict.server import Server
from support import ServerProcess, settings

class Node(ServerProcess):
    pass

async def test_bare() -> None:
    server = Server(settings())

def test_popen(tmp_path) -> None:
    subprocess.Popen([sys.executable, "-m", "fastaphlict", "--debug"])

def test_other_popen() -> None:
    subprocess.Popen([sys.executable, "-c", "pass"])

async def test_two_servers_share_a_port_only_with_reuse_port() -> None:
    Server(settings())
"""
    assert other_ways_to_start("test_x.py", source) == [
        "test_x.py: class Node(ServerProcess)",
        "test_x.py: Server(...) in test_bare",
        "test_x.py: Popen of fastaphlict in test_popen",
        "test_x.py: Server(...) in test_two_servers_share_a_port_only_with_reuse_port",
    ]
    # The same source as test_processes.py: its reuse-port test now starts through run().
    assert other_ways_to_start("test_processes.py", source)[-1].endswith(
        "port_only_with_reuse_port"
    )


def test_tests_start_servers_only_through_support() -> None:
    """One way in-process (``support.run``), one as a process (``support.spawn``)."""
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name != "support.py":
            offenders += other_ways_to_start(path.name, path.read_text(encoding="utf-8"))
    assert not offenders, offenders


def test_settings_are_what_the_command_line_resolves_on_free_local_ports(tmp_path: Path) -> None:
    built = support.settings(["--max-subscribers=8", "--debug"], {"FASTAPHLICT_PING_INTERVAL": "7"})
    assert built.limits.max_subscribers == 8 and built.debug
    assert built.limits.ping_interval == 7, "the environment given, read as resolve() reads it"
    assert built.config.servers == support.local_config().servers
    assert support.settings(["--pidfile", str(tmp_path / "p")]).config.pidfile == str(
        tmp_path / "p"
    )
    # A config named by the command line or the environment is the one served.
    assert support.settings([], {"ADMIN_PORT": "9000"}).config.admin_servers[0].port == 9000
    path = tmp_path / "aphlict.json"
    servers = [{"type": kind, "port": port} for kind, port in (("client", 9002), ("admin", 9001))]
    path.write_text(json.dumps({"servers": servers}))
    assert support.settings([f"--config={path}"]).config.admin_servers[0].port == 9001
    # What argv cannot say is given as a field.
    config = support.local_config(clients=2)
    assert support.settings(config=config, reuse_port=True).config is config


async def test_run_starts_a_node_on_a_broker_and_waits_for_it(
    redis_server: RedisServer,
) -> None:
    async with support.run(support.settings([f"--broker={redis_server.url}"])) as srv:
        await srv.broker_up()
        async with srv.client() as browser:
            await browser.subscribe("PHID-1")
            assert (await srv.post({"key": "k", "subscribers": ["PHID-1"]})).status == 200
            assert (await browser.recv())["key"] == "k", "delivered through Redis"
        broker = srv.server.broker
    assert broker is not None and broker.stats.published == 1
