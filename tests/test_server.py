"""Lifecycle of a real fastaphlict process: signals, graceful shutdown, pidfile, logs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastaphlict.config import Limits, PeerConfig
from fastaphlict.process import PidFile, PidFileError, is_server_command
from fastaphlict.server import Server, as_settings
from support import (
    TIMEOUT,
    ServerProcess,
    blackholed_port,
    eventually,
    free_ports,
    local_config,
    scaled,
    settings,
    spawn,
)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``proc(**config)``: a server started from a config file, stopped after the test.

    ``directory`` holds its log and config (``tmp_path`` unless given);
    ``ports`` are free ones unless given.
    """
    with contextlib.ExitStack() as stack:

        def make(
            directory: Path = tmp_path, ports: Sequence[int] | None = None, **config: object
        ) -> ServerProcess:
            log_path = directory / "server.log"
            return stack.enter_context(spawn(log_path, config=config, ports=ports))

        yield make


@pytest.mark.timeout(60)
async def test_sigterm_says_going_away_and_exits_zero(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "aphlict.pid"
    server = proc(pidfile=str(pidfile))
    server.wait_ready()
    await eventually(pidfile.exists)  # written once every listener is bound
    assert pidfile.read_text().strip() == str(server.pid)
    url = f"ws://127.0.0.1:{server.client_port}/~acme/"
    async with connect(url) as one, connect(url) as two:
        await one.send('{"command":"ping","data":null}')
        assert await asyncio.wait_for(one.recv(), TIMEOUT) == '{"type":"pong"}'
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for ws in (one, two):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1001, "browsers reconnect at once on going-away"
    assert await asyncio.to_thread(server.proc.wait, scaled(10)) == 0
    assert time.monotonic() - started < scaled(10)
    assert not pidfile.exists(), "the pidfile is removed at exit"
    assert "Traceback" not in server.log()


@pytest.mark.timeout(60)
async def test_stale_pidfile_is_replaced_with_a_warning(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    # A live process that is not fastaphlict: what a reboot leaves behind.
    squatter = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({scaled(30)})"])
    try:
        pidfile.write_text(f"{squatter.pid}\n")
        server = proc(pidfile=str(pidfile))
        server.wait_ready()
        await eventually(lambda: pidfile.read_text().strip() == str(server.pid))
        assert "replacing stale pidfile" in server.log()
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.timeout(60)
async def test_dead_pid_in_pidfile_is_replaced(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")
    server = proc(pidfile=str(pidfile))
    server.wait_ready()
    await eventually(lambda: pidfile.read_text().strip() == str(server.pid))


@pytest.mark.timeout(60)
async def test_live_server_pidfile_refuses_to_start(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    first = proc(pidfile=str(pidfile))
    first.wait_ready()
    await eventually(pidfile.exists)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = proc(second_dir, pidfile=str(pidfile))
    assert second.proc.wait(scaled(10)) == 1
    assert "still running" in second.log() and str(first.pid) in second.log()
    assert pidfile.read_text().strip() == str(first.pid), "left alone"


@pytest.mark.timeout(60)
async def test_sighup_reopens_log_files_for_logrotate(proc, tmp_path: Path) -> None:
    logfile = tmp_path / "logs" / "aphlict.log"
    server = proc(logs=[{"path": str(logfile)}])
    server.wait_ready()
    await eventually(lambda: "fastaphlict.server: ready" in logfile.read_text())
    rotated = logfile.with_suffix(".log.1")
    logfile.rename(rotated)
    server.proc.send_signal(signal.SIGHUP)
    await eventually(
        lambda: logfile.exists() and "log files reopened" in logfile.read_text(),
        TIMEOUT,
        "log files reopened",
    )
    async with connect(f"ws://127.0.0.1:{server.client_port}/") as ws:
        await ws.send("not json")  # logged at info, once per socket
        await ws.send('{"command":"ping","data":null}')
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    await eventually(lambda: "ignored frame" in logfile.read_text(), TIMEOUT, "ignored frame")
    assert "ignored frame" not in rotated.read_text()


async def test_a_failed_start_closes_listeners_and_the_peer_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pidfile is written once every listener is bound; when that fails (a
    # full disk, a race past --test), an unclosed relay session used to add an
    # asyncio "Unclosed client session" error to the operator's one line.
    def full_disk(self: PidFile) -> None:
        raise PidFileError(f"cannot write pidfile {self.path}: No space left on device")

    monkeypatch.setattr(PidFile, "write", full_disk)
    peer = PeerConfig("127.0.0.1", free_ports(1)[0], "http")
    config = dataclasses.replace(local_config(peers=(peer,)), pidfile=str(tmp_path / "a.pid"))
    server = Server(settings(config=config))
    with pytest.raises(PidFileError, match="No space left"):
        await asyncio.wait_for(server.serve(), TIMEOUT)
    session = server.relay._session
    assert session is not None and session.closed
    assert server._client_servers and not any(s.is_serving() for s in server._client_servers)


@pytest.mark.timeout(60)
def test_a_port_in_use_fails_in_one_line_naming_the_listener(proc) -> None:
    ports = free_ports(3)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        server = proc(
            ports=ports[:2], cluster=[{"host": "127.0.0.1", "port": ports[2], "protocol": "http"}]
        )
        assert server.proc.wait(scaled(10)) == 1
    problems = [line for line in server.log().splitlines() if " INFO " not in line]
    address = f"127.0.0.1:{server.admin_port}"
    assert len(problems) == 1, server.log()
    assert f'admin server (at index "1") cannot listen on {address}' in problems[0]
    assert problems[0].endswith("Address already in use")


@pytest.mark.timeout(60)
def test_sigterm_exits_within_200ms_with_an_unreachable_peer(proc) -> None:
    with blackholed_port() as port:
        server = proc(cluster=[{"host": "127.0.0.1", "port": port, "protocol": "http"}])
        server.wait_ready()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.admin_port}/", data=b'{"subscribers":[]}'
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert response.status == 200
        time.sleep(0.3)  # the relay is now stuck in its connect
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(scaled(10)) == 0
        assert time.monotonic() - started < scaled(0.2), server.log()


async def test_a_summary_line_reports_what_happened_since_the_last(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fastaphlict.server as server_module
    from support import run, settings

    monkeypatch.setattr(server_module, "SUMMARY_INTERVAL", scaled(0.3))
    caplog.set_level(logging.INFO, logger="fastaphlict.server")
    async with run(settings()) as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        await srv.post({"subscribers": ["PHID-1"]})
        await asyncio.wait_for(browser.recv(), TIMEOUT)
        await eventually(lambda: summaries(caplog, "1 message(s) in"), TIMEOUT, "a summary line")
        lines = summaries(caplog, "1 message(s) in")
    assert ": 1 socket(s) open, 1 message(s) in, 1 deliveries, 0 replay(s)," in lines[0]
    assert "0 slow disconnect(s), 0 dead disconnect(s)" in lines[0]
    assert not summaries(caplog, "2 message(s) in"), "each line counts since the last"


def summaries(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    messages = (r.getMessage() for r in caplog.records)
    return [m for m in messages if m.startswith("last ") and fragment in m]


# -- the pidfile's directory and the file itself -------------------------------------------


def test_the_pidfile_is_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    """Any local user could plant them first in /var/tmp/aphlict/pid/ (Phorge's default)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    pidfile = run / "aphlict.pid"
    # The temporary name once written with a plain open(), and the pidfile itself.
    (run / f"aphlict.pid.{os.getpid()}.tmp").symlink_to(victim)
    pidfile.symlink_to(victim)
    PidFile(str(pidfile)).write()
    assert victim.read_text() == "precious\n"
    assert not pidfile.is_symlink() and pidfile.read_text() == f"{os.getpid()}\n"
    assert pidfile.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("owner", "mode", "refused"),
    [
        (12345, 0o755, "belongs to another user (uid 12345)"),
        (None, 0o777, "is writable by every user and not sticky"),
        (None, 0o1777, None),
        (None, 0o755, None),
    ],
)
def test_a_pidfile_directory_another_user_could_swap_is_refused(
    tmp_path: Path, owner: int | None, mode: int, refused: str | None
) -> None:
    directory = tmp_path / "aphlict"
    directory.mkdir()
    os.chmod(directory, mode)
    if owner is not None:
        os.chown(directory, owner, owner)
    for where in (directory, directory / "pid"):  # the directory, or an ancestor of it
        pidfile = PidFile(str(where / "aphlict.pid"))
        if refused is None:
            pidfile.check()
            pidfile.write()
            pidfile.remove()
            continue
        for step in (pidfile.check, pidfile.write):
            with pytest.raises(PidFileError) as caught:
                step()
            assert str(caught.value) == f'refusing pidfile {pidfile.path}: "{directory}" {refused}'
        assert not (directory / "pid").exists()


@pytest.mark.parametrize(
    ("argv", "server"),
    [
        (["node", "/srv/phorge/support/aphlict/server/aphlict_server.js", "--config=x"], True),
        (["/usr/bin/nodejs", "aphlict_server.js"], True),
        (["/opt/fastaphlict/venv/bin/fastaphlict", "--config=/etc/aphlict.json"], True),
        (["/usr/bin/python3", "-m", "fastaphlict", "--test"], True),
        (["python3.11", "/opt/fastaphlict/venv/bin/fastaphlict"], True),
        (["python3", "-X", "dev", "-m", "fastaphlict"], True),
        (["python3", "-W", "ignore", "/opt/fastaphlict/venv/bin/fastaphlict"], True),
        (["python3", "-c", "print('fastaphlict')"], False),
        (["tail", "-f", "/var/log/aphlict.log"], False),
        (["less", "aphlict_server.js"], False),
        (["node", "/srv/other/server.js", "aphlict"], False),
        (["vim", "/etc/fastaphlict/aphlict.json"], False),
        (["python3", "-m", "http.server", "fastaphlict"], False),
        ([], False),
    ],
)
def test_only_a_real_aphlict_or_fastaphlict_owns_a_pidfile(argv: list[str], server: bool) -> None:
    assert is_server_command([arg.encode() for arg in argv]) is server


def test_a_stale_pidfile_naming_a_tail_of_the_aphlict_log_is_replaced(tmp_path: Path) -> None:
    log_file = tmp_path / "aphlict.log"
    log_file.write_text("")
    tail = subprocess.Popen(["tail", "-f", str(log_file)])
    try:
        pidfile = tmp_path / "aphlict.pid"
        pidfile.write_text(f"{tail.pid}\n")
        PidFile(str(pidfile)).check()  # a warning, not a refusal
    finally:
        tail.kill()
        tail.wait()


async def test_a_server_built_the_old_way_from_a_config_and_keywords_still_serves(
    tmp_path: Path,
) -> None:
    """Code that embeds the server as before Settings: ``Server(config, limits=..., ...)``."""
    config = local_config()
    limits = Limits(max_subscriptions=7)
    built = as_settings(config, limits=limits, debug=True, state_dir=str(tmp_path))
    assert (built.config, built.limits, built.debug, built.state_dir) == (
        config,
        limits,
        True,
        str(tmp_path),
    )
    assert as_settings(config, limits=None).limits == Limits()
    with pytest.raises(TypeError, match="unexpected keyword"):
        as_settings(built, debug=True)
    server = Server(config, limits=limits)
    await server.start()
    try:
        assert server.settings.limits.max_subscriptions == 7
        assert server.client_ports and server.admin_ports
    finally:
        await server.close()
