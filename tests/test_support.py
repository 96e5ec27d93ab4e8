"""The test helpers' own rules: cancellation passes through, time bounds scale, CI runs all."""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
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


#: Where a test may start a server other than through support's run or spawn,
#: by (module, function), and why. Everything else goes through support.
ALLOWED_STARTS: dict[tuple[str, str], str] = {
    ("test_server.py", "test_a_failed_start_closes_listeners_and_the_peer_session"): (
        "about the Server object itself: its serve() failing part way"
    ),
    ("test_server.py", "test_a_server_built_the_old_way_from_a_config_and_keywords_still_serves"): (
        "about the Server object itself: the embedding signature of before Settings"
    ),
    ("test_server.py", "test_only_a_real_aphlict_or_fastaphlict_owns_a_pidfile"): (
        "command lines as data: which process a pidfile names; nothing is run"
    ),
    ("test_cli.py", "run_cli"): (
        "the command line as an operator types it: --test, --help, --version, and"
        " arguments refused before anything is served"
    ),
    ("test_state.py", "run_cli"): "--test, and a start refused for an unwritable state dir",
    ("test_docs.py", "test_a_documented_config_passes_the_config_test"): (
        "the documented `fastaphlict --test` on the documented file"
    ),
    ("test_processes.py", "test_test_checks_the_pidfile_override_naming_where_it_came_from"): (
        "main() with --test, its argv built in a variable"
    ),
    ("test_doctor.py", "test_usage_mistakes_exit_2_with_one_line"): (
        "main() on parametrized `doctor` command lines, each refused as a usage mistake"
    ),
    ("test_support.py", "commands"): "the guard's own pattern of a command list",
    ("test_support.py", "test_the_guard_finds_every_other_way_to_start_a_server"): (
        "the guard's own samples, as text it parses"
    ),
    **{
        ("test_cli.py", test): "main() refuses the arguments before anything is served"
        for test in (
            "test_bad_admin_allow_list_fails_at_start",
            "test_bad_shutdown_timeout_is_a_usage_error",
            "test_a_malformed_broker_url_names_its_source_and_never_the_password",
            "test_a_broker_ca_file_without_rediss_is_refused",
            "test_a_sentinel_password_without_a_sentinel_broker_is_refused",
            "test_reuse_port_without_a_broker_is_refused",
        )
    },
    **{
        ("test_tls.py", test): "main() refuses the TLS files before it listens, as --test does"
        for test in (
            "test_a_bad_tls_key_fails_the_start_as_it_fails_the_test",
            "test_a_bad_peer_ca_file_fails_the_start_as_it_fails_the_test",
        )
    },
}
# Not seen here, and rightly: the docs tests (test_docs*.py) run the README's and the
# docs' command lines verbatim through ``sh -c``, a text that is the docs' own.

#: Fixtures that stand in for ``fastaphlict.server.run``: ``cli.main`` under one
#: of them records what it would have served and starts nothing.
STAND_INS = {"fake_server", "runs"}

#: What starts a server in-process when called (or names one to start later).
_STARTERS = {"fastaphlict.server.Server", "fastaphlict.server.run", "support.Server"}
#: The command line's entry points: they serve unless told ``--test`` (or ``--help``).
_MAINS = {"fastaphlict.cli.main", "fastaphlict.cli.entry", "fastaphlict.__main__.main"}
#: A command string that runs the server: ``python -m fastaphlict``, ``.../bin/fastaphlict``.
_COMMAND = re.compile(
    r"-m\s+fastaphlict(\s|$)|^\s*(\S*bin/)?fastaphlict\s+-|\S*bin/fastaphlict(\s|$)"
)


def told_not_to_serve(arg: str | None) -> bool:
    """``--test`` (not ``--test=false``), ``--help``, ``--version`` or the ``doctor``
    subcommand (a client of a server, never one): main() serves nothing."""
    if arg in ("--test", "--help", "--version", "doctor"):
        return True
    flag, _, value = (arg or "").partition("=")
    return flag == "--test" and value.lower() not in ("0", "false", "no", "off")


def other_ways_to_start(
    name: str, source: str, allowed: Mapping[tuple[str, str], str] = ALLOWED_STARTS
) -> list[str]:
    """Where module ``name`` starts a fastaphlict server other than by support's run or spawn.

    Found: a reference to ``fastaphlict.server.Server`` or ``run`` under any
    name (imported as another name, or reached as an attribute); a call of
    ``ServerProcess(...)`` or ``_popen(...)`` or a subclass of ``ServerProcess``;
    ``cli.main([...])`` without ``--test`` outside a stand-in for the server's
    run (:data:`STAND_INS`); and any string that is a server command line, as
    a list (``[..., "-m", "fastaphlict"]``, ``["fastaphlict", ...]``) or as
    one string (``"python -m fastaphlict"``, ``".venv/bin/fastaphlict --test"``),
    wherever it is built. :data:`ALLOWED_STARTS` lists the exceptions.
    """
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    aliases[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def qualified(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = qualified(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    docstrings = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (body := node.body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
    }

    def word(node: ast.AST) -> str | None:
        return (
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
        )

    def commands(words: list[ast.expr]) -> bool:
        """``[..., "-m", "fastaphlict", ...]`` or ``["fastaphlict", "-...", ...]``; no --test."""
        texts = [word(element) for element in words]
        if any(map(told_not_to_serve, texts)):
            return False  # it checks the config and serves nothing
        program = texts[:1] == ["fastaphlict"] and (texts[1:2] or [""])[0].startswith("-")
        return program or ("-m", "fastaphlict") in itertools.pairwise(texts)

    found: list[str] = []

    def visit(node: ast.AST, scope: str, stand_in: bool) -> None:
        what = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = node.name
            # A stand-in: a fixture replacing the server's run(), or the module replaced here.
            stand_in = bool({a.arg for a in node.args.args + node.args.kwonlyargs} & STAND_INS)
            stand_in = stand_in or any(
                isinstance(n, ast.Call) and any(word(a) == "fastaphlict.server" for a in n.args)
                for n in ast.walk(node)
            )
        if isinstance(node, ast.ClassDef) and any(
            (qualified(base) or "").split(".")[-1] == "ServerProcess" for base in node.bases
        ):
            what = f"class {node.name}(ServerProcess)"
        elif isinstance(node, (ast.Name, ast.Attribute)) and qualified(node) in _STARTERS:
            what = f"{qualified(node)}"
        elif isinstance(node, ast.Call):
            called = qualified(node.func) or ""
            if called.split(".")[-1] in ("ServerProcess", "_popen"):
                what = f"{called.split('.')[-1]}(...)"
            elif called in _MAINS and not stand_in:
                argv = node.args[0] if node.args else None
                told = isinstance(argv, (ast.List, ast.Tuple)) and any(
                    told_not_to_serve(word(arg)) for arg in argv.elts
                )
                if not told:
                    what = "cli.main(...) without --test"
            elif commands(node.args):
                what = "a fastaphlict command"
        elif isinstance(node, (ast.List, ast.Tuple)) and commands(node.elts):
            what = "a fastaphlict command"
        elif (text := word(node)) and id(node) not in docstrings and _COMMAND.search(text):
            what = f"the command {text!r}"
        if what is not None and (name, scope) not in allowed:
            found.append(f"{name}: {what} in {scope}")
        for child in ast.iter_child_nodes(node):
            visit(child, scope, stand_in)

    visit(tree, "<module>", False)
    return found


def test_the_guard_finds_every_other_way_to_start_a_server() -> None:
    source = """
import asyncio, logging, subprocess, sys
import fastaphlict.server
import support
from fastaphlict import cli
from fastaphlict.server import Server
from fastaphlict.server import Server as Node
from support import ServerProcess, settings

COMMAND = [sys.executable, "-m", "fastaphlict", "--debug"]

class Child(ServerProcess):
    pass

async def test_bare() -> None:
    Server(settings())

async def test_renamed() -> None:
    Node(settings())

def test_run_of_the_module() -> None:
    fastaphlict.server.run(settings())

def test_main_serving() -> None:
    cli.main(["--debug"])

async def test_exec() -> None:
    await asyncio.create_subprocess_exec(sys.executable, "-m", "fastaphlict")

def test_module_command() -> None:
    subprocess.Popen(COMMAND)

def command() -> list[str]:
    return [sys.executable, "-m", "fastaphlict"]

def test_popen_of_a_helper() -> None:
    subprocess.Popen(command())

def test_support_popen(tmp_path) -> None:
    support._popen(command(), {}, tmp_path / "log")

def test_server_process(tmp_path) -> None:
    ServerProcess(None, 1, 2, tmp_path / "log", [], {})

def test_shell() -> None:
    subprocess.Popen(f"{sys.executable} -m fastaphlict --debug", shell=True)

def test_run_of_a_program() -> None:
    subprocess.run(["fastaphlict", "--debug"])

# None of these starts a server:
def test_config_test(fake_server) -> None:
    subprocess.run([sys.executable, "-m", "fastaphlict", "--test"])
    cli.main(["--test", "--debug"])
    cli.main(["--debug"]), "fake_server stands in for the server's run()"
    logging.getLogger("fastaphlict")

def test_other_popen() -> None:
    subprocess.Popen([sys.executable, "-c", "pass"])

def test_a_failed_start_closes_listeners_and_the_peer_session() -> None:
    Server(settings())
"""
    assert other_ways_to_start("test_x.py", source) == [
        "test_x.py: a fastaphlict command in <module>",
        "test_x.py: class Child(ServerProcess) in <module>",
        "test_x.py: fastaphlict.server.Server in test_bare",
        "test_x.py: fastaphlict.server.Server in test_renamed",
        "test_x.py: fastaphlict.server.run in test_run_of_the_module",
        "test_x.py: cli.main(...) without --test in test_main_serving",
        "test_x.py: a fastaphlict command in test_exec",
        "test_x.py: a fastaphlict command in command",
        "test_x.py: _popen(...) in test_support_popen",
        "test_x.py: ServerProcess(...) in test_server_process",
        "test_x.py: the command ' -m fastaphlict --debug' in test_shell",
        "test_x.py: a fastaphlict command in test_run_of_a_program",
        "test_x.py: fastaphlict.server.Server in"
        " test_a_failed_start_closes_listeners_and_the_peer_session",
    ]
    # The same source as test_server.py: its test about a failing serve() may build a Server.
    assert other_ways_to_start("test_server.py", source)[-1].endswith("in test_run_of_a_program")


def test_tests_start_servers_only_through_support() -> None:
    """One way in-process (``support.run``), one as a process (``support.spawn``)."""
    offenders, unguarded = [], []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name != "support.py":
            source = path.read_text(encoding="utf-8")
            offenders += other_ways_to_start(path.name, source)
            unguarded += other_ways_to_start(path.name, source, allowed={})
    assert not offenders, offenders
    # Every exception still names a place that needs it: a stale one would hide a new start.
    needed = {(line.split(":")[0], line.rpartition(" in ")[2]) for line in unguarded}
    assert set(ALLOWED_STARTS) <= needed, set(ALLOWED_STARTS) - needed


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


#: The support modules: the one wait (``eventually``) and its process forms live there.
SUPPORT_MODULES = {"support.py", "redis_support.py", "docs_support.py", "nginx_support.py"}

#: Loops that read a clock and sleep yet are no wait for a condition, by (module,
#: function), and why. Every other such loop is a wait: ``support.eventually``.
ALLOWED_CLOCK_LOOPS: dict[tuple[str, str], str] = {
    ("test_admin.py", "test_a_client_trickling_a_huge_body_is_cut_off_after_the_413"): (
        "drives the server: a byte written each round until the socket is cut off"
    ),
    ("test_admin.py", "test_answers_left_unread_are_no_activity"): (
        "drives the protocol: a post fed each round until it gives up on the reader"
    ),
    ("test_cluster.py", "test_self_peer_loops_back_once_then_stops_relaying"): (
        "watches that something stays true for a period (no marker can prove a relay absent)"
    ),
    ("test_replay.py", "next_event"): "paces reading a stream at a set rate",
    ("test_restart.py", "test_a_restart_on_systemds_sockets_loses_nothing"): (
        "drives the server: a warm-up post each round until every tab has one"
    ),
    ("test_restart.py", "post_steadily"): "posts at a set rate for a period: load, not a wait",
    ("test_soak.py", "post_forever"): "posts at a set rate until told to stop: load, not a wait",
    ("test_dashboard_browser.py", "_traffic"): (
        "posts at a rate that rises and falls for a period: load for the page to show, not a wait"
    ),
    ("test_docs_cluster.py", "wait_gone"): (
        "synchronous (eventually awaits), and it returns what outlived the bound for the"
        " caller to kill and report"
    ),
    ("test_redis_support.py", "test_no_server_outlives_its_python"): (
        "synchronous: about redis_support's own process clean-up"
    ),
}

_CLOCKS = {"monotonic", "time", "perf_counter"}


def clock_polls(
    name: str, source: str, allowed: Mapping[tuple[str, str], str] = ALLOWED_CLOCK_LOOPS
) -> list[str]:
    """The ``while`` loops of module ``name`` that read a clock and sleep: deadline polls.

    A clock read (``time.monotonic()``, ``loop.time()``, ``time.perf_counter()``)
    and a sleep (``time.sleep``, ``asyncio.sleep``) in one loop, outside
    :data:`ALLOWED_CLOCK_LOOPS`.
    """

    def called(node: ast.Call) -> str:
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")

    found: list[str] = []

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = node.name
        if isinstance(node, ast.While) and (name, scope) not in allowed:
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
            clock = any(called(call) in _CLOCKS and not call.args for call in calls)
            if clock and any(called(call) == "sleep" for call in calls):
                found.append(f"{name}:{node.lineno}: a deadline poll in {scope}")
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(ast.parse(source), "<module>")
    return found


def test_the_wait_guard_finds_a_deadline_poll() -> None:
    source = """
import asyncio, time

async def test_poll(srv) -> None:
    deadline = time.monotonic() + 5
    while not srv.ready:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

async def test_loop_time(srv) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        if srv.ready:
            break
        await asyncio.sleep(0.01)

def wait(proc) -> None:
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)

async def test_reads(reader) -> None:
    while True:  # no clock: a read loop bounded by its reads' own timeouts
        await asyncio.sleep(0)

async def post_forever() -> None:
    while time.monotonic() < 10:
        await asyncio.sleep(0.1)
"""
    assert clock_polls("test_x.py", source) == [
        "test_x.py:6: a deadline poll in test_poll",
        "test_x.py:13: a deadline poll in test_loop_time",
        "test_x.py:20: a deadline poll in wait",
        "test_x.py:28: a deadline poll in post_forever",
    ]
    # The same source as test_soak.py: its paced poster is allowed its clock.
    assert clock_polls("test_soak.py", source)[-1].endswith("in wait")


def test_tests_wait_only_through_eventually() -> None:
    """A loop polling a condition until a deadline is ``support.eventually``."""
    found, unguarded = [], []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name not in SUPPORT_MODULES:
            source = path.read_text(encoding="utf-8")
            found += clock_polls(path.name, source)
            unguarded += clock_polls(path.name, source, allowed={})
    assert not found, found
    # Every exception still names such a loop: a stale one would hide a new poll.
    needed = {(line.split(":")[0], line.rpartition(" in ")[2]) for line in unguarded}
    assert set(ALLOWED_CLOCK_LOOPS) <= needed, set(ALLOWED_CLOCK_LOOPS) - needed
