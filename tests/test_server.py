"""Lifecycle of a real fastaphlict process: signals, graceful shutdown, pidfile, logs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastaphlict.config import PeerConfig
from fastaphlict.server import PidFile, PidFileError, Server
from support import TIMEOUT, blackholed_port, child_env, free_ports, local_config, scaled


def eventually(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


class Proc:
    """A fastaphlict process started from a config file, its log on disk."""

    def __init__(self, tmp: Path, **extra: object) -> None:
        self.client_port, self.admin_port = free_ports(2)
        self.config = {
            "servers": [
                {"type": "client", "port": self.client_port, "listen": "127.0.0.1"},
                {"type": "admin", "port": self.admin_port, "listen": "127.0.0.1"},
            ],
            **extra,
        }
        self.path = tmp / "aphlict.json"
        self.path.write_text(json.dumps(self.config))
        self.stderr = tmp / "stderr.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Proc:
        with open(self.stderr, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fastaphlict", f"--config={self.path}", *args],
                env=child_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self

    def wait_ready(self, timeout: float = scaled(10.0)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"exited early: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), 0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"never ready: {self.log()}")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(scaled(5))


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    procs: list[Proc] = []

    def make(**extra: object) -> Proc:
        p = Proc(tmp_path, **extra)
        procs.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in procs:
        p.stop()


@pytest.mark.timeout(60)
async def test_sigterm_says_going_away_and_exits_zero(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "aphlict.pid"
    server = proc(pidfile=str(pidfile)).start()
    server.wait_ready()
    eventually(pidfile.exists)  # written once every listener is bound
    assert pidfile.read_text().strip() == str(server.process.pid)
    url = f"ws://127.0.0.1:{server.client_port}/~acme/"
    async with connect(url) as one, connect(url) as two:
        await one.send('{"command":"ping","data":null}')
        assert await asyncio.wait_for(one.recv(), TIMEOUT) == '{"type":"pong"}'
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for ws in (one, two):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1001, "browsers reconnect at once on going-away"
    assert await asyncio.to_thread(server.process.wait, scaled(10)) == 0
    assert time.monotonic() - started < scaled(10)
    assert not pidfile.exists(), "the pidfile is removed at exit"
    assert "Traceback" not in server.log()


@pytest.mark.timeout(60)
def test_stale_pidfile_is_replaced_with_a_warning(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    # A live process that is not fastaphlict: what a reboot leaves behind.
    squatter = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({scaled(30)})"])
    try:
        pidfile.write_text(f"{squatter.pid}\n")
        server = proc(pidfile=str(pidfile)).start()
        server.wait_ready()
        eventually(lambda: pidfile.read_text().strip() == str(server.process.pid))
        assert "replacing stale pidfile" in server.log()
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.timeout(60)
def test_dead_pid_in_pidfile_is_replaced(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")
    server = proc(pidfile=str(pidfile)).start()
    server.wait_ready()
    eventually(lambda: pidfile.read_text().strip() == str(server.process.pid))


@pytest.mark.timeout(60)
def test_live_server_pidfile_refuses_to_start(proc, tmp_path: Path) -> None:
    pidfile = tmp_path / "aphlict.pid"
    first = proc(pidfile=str(pidfile)).start()
    first.wait_ready()
    eventually(pidfile.exists)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = Proc(second_dir, pidfile=str(pidfile)).start()
    try:
        assert second.process.wait(scaled(10)) == 1
        assert "still running" in second.log() and str(first.process.pid) in second.log()
        assert pidfile.read_text().strip() == str(first.process.pid), "left alone"
    finally:
        second.stop()


@pytest.mark.timeout(60)
async def test_sighup_reopens_log_files_for_logrotate(proc, tmp_path: Path) -> None:
    logfile = tmp_path / "logs" / "aphlict.log"
    server = proc(logs=[{"path": str(logfile)}]).start()
    server.wait_ready()
    eventually(lambda: "fastaphlict.server: ready" in logfile.read_text())
    rotated = logfile.with_suffix(".log.1")
    logfile.rename(rotated)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while not (logfile.exists() and "log files reopened" in logfile.read_text()):
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.02)
    async with connect(f"ws://127.0.0.1:{server.client_port}/") as ws:
        await ws.send("not json")  # logged at info, once per socket
        await ws.send('{"command":"ping","data":null}')
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while "ignored frame" not in logfile.read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
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
    server = Server(config)
    with pytest.raises(PidFileError, match="No space left"):
        await asyncio.wait_for(server.serve(), TIMEOUT)
    session = server.relay._session
    assert session is not None and session.closed
    assert server._client_servers and not any(s.is_serving() for s in server._client_servers)


@pytest.mark.timeout(60)
def test_a_port_in_use_fails_in_one_line_naming_the_listener(proc) -> None:
    server = proc(cluster=[{"host": "127.0.0.1", "port": free_ports(1)[0], "protocol": "http"}])
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", server.admin_port))
        taken.listen()
        server.start()
        assert server.process.wait(scaled(10)) == 1
    problems = [line for line in server.log().splitlines() if " INFO " not in line]
    address = f"127.0.0.1:{server.admin_port}"
    assert len(problems) == 1, server.log()
    assert f'admin server (at index "1") cannot listen on {address}' in problems[0]
    assert problems[0].endswith("Address already in use")


@pytest.mark.timeout(60)
def test_sigterm_exits_within_200ms_with_an_unreachable_peer(proc) -> None:
    with blackholed_port() as port:
        server = proc(cluster=[{"host": "127.0.0.1", "port": port, "protocol": "http"}]).start()
        server.wait_ready()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.admin_port}/", data=b'{"subscribers":[]}'
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert response.status == 200
        time.sleep(0.3)  # the relay is now stuck in its connect
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(scaled(10)) == 0
        assert time.monotonic() - started < scaled(0.2), server.log()


async def test_a_summary_line_reports_what_happened_since_the_last(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fastaphlict.server as server_module
    from support import running

    monkeypatch.setattr(server_module, "SUMMARY_INTERVAL", scaled(0.3))
    caplog.set_level(logging.INFO, logger="fastaphlict.server")
    async with running() as srv, srv.client() as browser:
        await browser.subscribe("PHID-1")
        await srv.post({"subscribers": ["PHID-1"]})
        await asyncio.wait_for(browser.recv(), TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not (lines := summaries(caplog, "1 message(s) in")):
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.02)
    assert ": 1 socket(s) open, 1 message(s) in, 1 deliveries, 0 replay(s)," in lines[0]
    assert "0 slow disconnect(s), 0 dead disconnect(s)" in lines[0]
    assert not summaries(caplog, "2 message(s) in"), "each line counts since the last"


def summaries(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    messages = (r.getMessage() for r in caplog.records)
    return [m for m in messages if m.startswith("last ") and fragment in m]
