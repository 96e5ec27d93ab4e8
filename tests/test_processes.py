"""Several fastaphlict processes on one host: ``--pidfile`` and ``--reuse-port``.

N processes started from one config need a pidfile each (``--pidfile``) and,
to share the client and admin ports, SO_REUSEPORT (``--reuse-port``): the
kernel then hands each new connection to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fastaphlict import cli
from fastaphlict.config import Config, ServerConfig, Settings, load_config
from redis_support import RedisServer
from support import (
    ServerProcess,
    activated,
    as_options,
    bare_session,
    eventually,
    free_ports,
    listening,
    metric,
    post,
    run,
    scaled,
    settings,
    spawn,
    stop,
    wait_healthy,
)

#: The variables these tests set; kept out of the in-process CLI unless a test sets them.
VARIABLES = (
    "FASTAPHLICT_PIDFILE",
    "FASTAPHLICT_REUSE_PORT",
    "FASTAPHLICT_BROKER",
    "APHLICT_CONFIG",
)

GOOD: dict[str, Any] = {
    "servers": [
        {"type": "client", "port": 22280, "listen": "127.0.0.1"},
        {"type": "admin", "port": 22281, "listen": "127.0.0.1"},
    ],
}


@pytest.fixture
def good_config(tmp_path: Path) -> str:
    path = tmp_path / "aphlict.json"
    path.write_text(json.dumps(GOOD))
    return str(path)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The caller's variables stay out; the CLI's logging set-up is undone."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
            handler.close()


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, dict[str, object]]]:
    """Stand in for fastaphlict.server: record the config and options of each run()."""
    calls: list[tuple[Config, dict[str, object]]] = []

    def run(settings: Settings, **options: object) -> int:
        calls.append((settings.config, {**as_options(settings), **options}))
        return 0

    module = types.ModuleType("fastaphlict.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastaphlict.server", module)
    return calls


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Servers a test launched: all stopped afterwards."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        stop(*started)


def problems(server: ServerProcess) -> list[str]:
    """The log's lines above INFO: what an operator is told went wrong."""
    return [line for line in server.log().splitlines() if " INFO " not in line]


# -- --pidfile ---------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_the_pidfile_flag_beats_the_variable_and_the_config(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    from_config, from_variable = tmp_path / "config.pid", tmp_path / "variable.pid"
    from_flag = tmp_path / "run" / "flag.pid"
    server = spawn(
        tmp_path / "server.log",
        f"--pidfile={from_flag}",
        config={"pidfile": str(from_config)},
        env={"FASTAPHLICT_PIDFILE": str(from_variable)},
    )
    processes.append(server)
    await asyncio.to_thread(server.wait_ready)
    await eventually(from_flag.exists)  # written once every listener is bound
    assert from_flag.read_text().strip() == str(server.pid)
    assert not from_config.exists() and not from_variable.exists()
    server.stop()
    assert server.proc.returncode == 0, server.log()
    assert not from_flag.exists(), "removed at exit"


@pytest.mark.timeout(60)
async def test_the_pidfile_variable_beats_the_config(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    from_config, from_variable = tmp_path / "config.pid", tmp_path / "variable.pid"
    server = spawn(
        tmp_path / "server.log",
        config={"pidfile": str(from_config)},
        env={"FASTAPHLICT_PIDFILE": str(from_variable)},
    )
    processes.append(server)
    await asyncio.to_thread(server.wait_ready)
    await eventually(from_variable.exists)
    assert from_variable.read_text().strip() == str(server.pid)
    assert not from_config.exists()
    server.stop()
    assert not from_variable.exists(), "removed at exit"


@pytest.mark.timeout(60)
async def test_a_live_server_on_the_pidfile_refuses_the_second_in_one_line(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    pidfile = tmp_path / "shared.pid"
    first = spawn(tmp_path / "first.log", f"--pidfile={pidfile}")
    processes.append(first)
    await asyncio.to_thread(first.wait_ready)
    await eventually(pidfile.exists)
    # Other ports: the pidfile alone must refuse it.
    second = spawn(tmp_path / "second.log", f"--pidfile={pidfile}")
    processes.append(second)
    assert await asyncio.to_thread(second.proc.wait, scaled(10)) == 1
    [line] = problems(second)
    assert f"pidfile {pidfile} names process {first.pid}, which is still running" in line
    assert "its own --pidfile" in line
    assert pidfile.read_text().strip() == str(first.pid), "left alone"


@pytest.mark.parametrize(
    ("flags", "variable", "named"),
    [
        (["--pidfile={bad}"], "", "fastaphlict: --pidfile={bad}: can not be written: "),
        (
            [],
            "{bad}",
            "fastaphlict: FASTAPHLICT_PIDFILE={bad} (environment, for --pidfile): can not be",
        ),
    ],
)
def test_test_checks_the_pidfile_override_naming_where_it_came_from(
    tmp_path: Path,
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    variable: str,
    named: str,
) -> None:
    (tmp_path / "a-file").write_text("")
    bad = str(tmp_path / "a-file" / "run" / "fastaphlict.pid")
    monkeypatch.setenv("FASTAPHLICT_PIDFILE", variable.format(bad=bad))
    args = ["--test", f"--config={good_config}", *(f.format(bad=bad) for f in flags)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(named.format(bad=bad)), err
    assert "not a directory" in err and err.count("\n") == 1


def test_test_accepts_a_creatable_pidfile_override_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.json"
    # The config's own pidfile can't be written: overridden, it isn't checked.
    (tmp_path / "a-file").write_text("")
    config.write_text(json.dumps({**GOOD, "pidfile": str(tmp_path / "a-file" / "x.pid")}))
    pidfile = tmp_path / "run" / "2" / "fastaphlict.pid"
    assert cli.main(["--test", f"--config={config}", f"--pidfile={pidfile}"]) == 0
    assert capsys.readouterr().out == "Configuration test OK.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.json"]


def test_the_pidfile_override_reaches_the_server(
    runs: list[tuple[Config, dict[str, object]]], good_config: str, tmp_path: Path
) -> None:
    assert cli.main([f"--config={good_config}", f"--pidfile={tmp_path / 'a.pid'}"]) == 0
    [(config, _)] = runs
    assert config.pidfile == str(tmp_path / "a.pid")
    assert config.servers == load_config(good_config).servers, "the rest is the file's"


# -- --reuse-port: the flag --------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "variable", "reuse_port"),
    [
        ([], "", False),
        (["--reuse-port"], "", True),
        (["--reuse-port=1"], "", True),
        (["--reuse-port=false"], "", False),
        ([], "true", True),
        ([], "0", False),
        (["--reuse-port=0"], "1", False),
        (["--reuse-port"], "false", True),
    ],
)
def test_reuse_port_flag_and_variable(
    runs: list[tuple[Config, dict[str, object]]],
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    variable: str,
    reuse_port: bool,
) -> None:
    monkeypatch.setenv("FASTAPHLICT_REUSE_PORT", variable)
    monkeypatch.setenv("FASTAPHLICT_BROKER", "redis://127.0.0.1:6379/0")  # --reuse-port needs one
    assert cli.main([f"--config={good_config}", *flags]) == 0
    [(_, options)] = runs
    assert options["reuse_port"] is reuse_port


def test_a_bad_reuse_port_variable_is_named(
    good_config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTAPHLICT_REUSE_PORT", "sometimes")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    assert capsys.readouterr().err.startswith(
        "fastaphlict: FASTAPHLICT_REUSE_PORT=sometimes (environment, for --reuse-port)"
    )
    assert cli.main(["--test", f"--config={good_config}", "--reuse-port=sometimes"]) == 2


# -- --reuse-port: in-process --------------------------------------------------------


async def test_two_servers_share_a_port_only_with_reuse_port() -> None:
    async with run(settings(reuse_port=True)) as first:
        client_ports, admin_ports = first.server.client_ports, first.server.admin_ports
        shared = Config(
            servers=(
                ServerConfig("client", client_ports[0], "127.0.0.1"),
                ServerConfig("admin", admin_ports[0], "127.0.0.1"),
            )
        )
        async with run(settings(config=shared, reuse_port=True)) as second:
            assert second.server.client_ports == client_ports
            assert second.server.admin_ports == admin_ports
        with pytest.raises(OSError, match=f"127.0.0.1:{client_ports[0]}: Address already in"):
            async with run(settings(config=shared)):
                pass


# -- --reuse-port: processes ---------------------------------------------------------


def shared_ports_config(client: int, admin: int, private_admin: int) -> dict[str, Any]:
    """The shared client and admin ports, and an admin port of this process only."""
    return {
        "servers": [
            {"type": "client", "port": client, "listen": "127.0.0.1"},
            {"type": "admin", "port": admin, "listen": "127.0.0.1"},
            {"type": "admin", "port": private_admin, "listen": "127.0.0.1"},
        ]
    }


async def status(session: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    """The ``/status/`` of this very process, through its private admin port."""
    async with session.get(f"{server.admin_url}/status/") as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


@pytest.mark.timeout(90)
async def test_reuse_port_spreads_clients_and_posts_over_two_processes(
    tmp_path: Path, processes: list[ServerProcess], redis_server: RedisServer
) -> None:
    client, admin, *private = free_ports(4)
    for name, own in zip("ab", private, strict=True):
        processes.append(
            spawn(
                tmp_path / f"{name}.log",
                "--reuse-port",
                config=shared_ports_config(client, admin, own),
                ports=(client, own),
                env={"FASTAPHLICT_BROKER": redis_server.url},
            )
        )
    # A fresh connection per request: the kernel picks a process per connection.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for server in processes:
            await wait_healthy(server, session)
        for server in processes:
            assert "client server listening on 127.0.0.1:" in server.log()
            assert f"{client} (shared port, SO_REUSEPORT)" in server.log()
        # SO_REUSEPORT hashes the source port: 40 connections all landing on
        # one of two processes has odds of 2**-39. Go on until both have some.
        made = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(30)
        while True:
            for _ in range(40):
                await bare_session(client, "/")
                resp = await post(session, f"http://127.0.0.1:{admin}", {"subscribers": []})
                assert resp.status == 200
                made += 1
            seen = [await status(session, server) for server in processes]
            # Each process published the posts it took to the broker.
            posted = [
                await metric(session, server.admin_url, "fastaphlict_broker_published_total")
                for server in processes
            ]
            if all(s["clients.total"] for s in seen) and all(posted):
                break
            assert loop.time() < deadline, f"after {made} connections: {seen} {posted}"
        assert sum(s["clients.total"] for s in seen) == made, "every connection went somewhere"
        # The other took each in from the broker: every process has every message.
        for server in processes:

            async def has_every_message(server: ServerProcess = server) -> bool:
                return (await status(session, server))["messages.in"] == made

            await eventually(has_every_message, scaled(10), "every message in", every=0.02)


@pytest.mark.timeout(60)
async def test_without_reuse_port_the_second_process_finds_the_port_taken(
    tmp_path: Path, processes: list[ServerProcess], redis_server: RedisServer
) -> None:
    client, admin, *private = free_ports(4)
    first = spawn(
        tmp_path / "first.log",
        "--reuse-port",
        config=shared_ports_config(client, admin, private[0]),
        ports=(client, private[0]),
        env={"FASTAPHLICT_BROKER": redis_server.url},
    )
    processes.append(first)
    await asyncio.to_thread(first.wait_ready)
    second = spawn(
        tmp_path / "second.log",
        config=shared_ports_config(client, admin, private[1]),
        ports=(client, private[1]),
    )
    processes.append(second)
    assert await asyncio.to_thread(second.proc.wait, scaled(10)) == 1
    [line] = problems(second)
    assert f'client server (at index "0") cannot listen on 127.0.0.1:{client}' in line
    assert line.endswith("Address already in use")


@pytest.mark.timeout(60)
async def test_reuse_port_does_not_apply_to_inherited_sockets(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(listening()) for _ in range(2)]
        server = activated(
            tmp_path / "server.log",
            sockets,
            args=("--reuse-port", f"--broker={redis_server.url}"),
        )
        try:
            await asyncio.to_thread(server.wait_ready)
            log = server.log()
            for sock in sockets:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            assert log.count("--reuse-port does not apply to inherited socket") == 2, log
            assert "shared port" not in log
        finally:
            server.stop()
