"""The process's exit: once the server has stopped, at once, with nothing left undone.

A restart under systemd waits for the old process to exit before it starts
the new one, so the command line ends the process as soon as the server has
stopped cleanly (``fastaphlict.server.exit_now``) instead of letting the
interpreter free every object the server held. These tests check that
nothing a user relies on is skipped with it: the log, the standard streams,
the pidfile, the state directory, the exit status.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from support import (
    PHORGE_CONTENT_TYPE,
    SHUTDOWN,
    TIMEOUT,
    child_env,
    free_ports,
    scaled,
    spawn,
    stalled_websocket,
)

#: A stand-in for the server's run(): prints (buffered: stdout is a pipe),
#: registers an exit handler, optionally leaves a thread running, then stops
#: as the real one does: through exit_now when the entry point asks for it.
STUB = """
import atexit, sys, threading
import fastaphlict.cli as cli
import fastaphlict.server as server

mode = sys.argv.pop()

def run(settings, *, exit_when_stopped=False, **options):
    print("served", end="")
    atexit.register(print, " and torn down", end="")
    if mode == "thread":
        release = threading.Event()
        threading.Thread(target=release.wait, args=(0.5,)).start()
    if exit_when_stopped:
        server.exit_now(7)
    return 3

server.run = run
cli.entry()
"""


@pytest.mark.parametrize(
    ("thread", "status", "out"),
    [("none", 7, "served"), ("thread", 3, "served and torn down")],
    ids=["at-once", "another-thread-runs"],
)
def test_the_entry_point_ends_the_process_once_stopped_with_its_output_flushed(
    tmp_path: Path, thread: str, status: int, out: str
) -> None:
    client, admin = free_ports(2)
    config = tmp_path / "aphlict.json"
    servers = [{"type": "client", "port": client}, {"type": "admin", "port": admin}]
    config.write_text(json.dumps({"servers": servers, "logs": []}))
    done = subprocess.run(
        [sys.executable, "-c", STUB, f"--config={config}", thread],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == out, "flushed; the teardown skipped only when nothing else runs"


def test_a_stopped_server_exits_with_its_log_pidfile_and_state_done(tmp_path: Path) -> None:
    log_file, pidfile, state = tmp_path / "aphlict.log", tmp_path / "aphlict.pid", tmp_path / "s"
    config = {"logs": [{"path": str(log_file)}], "pidfile": str(pidfile)}
    server = spawn(tmp_path / "server.log", f"--state-dir={state}", config=config)
    try:
        server.wait_ready()
        body = json.dumps({"key": "k", "subscribers": ["PHID-USER-1"]}).encode()
        request = urllib.request.Request(
            f"{server.admin_url}/", body, {"Content-Type": PHORGE_CONTENT_TYPE}
        )
        with urllib.request.urlopen(request, timeout=scaled(5)) as answer:
            assert answer.status == 200
        assert pidfile.exists()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(SHUTDOWN) == 0, server.log()
    finally:
        server.stop()
    lines = log_file.read_text().splitlines()
    assert lines[-1].endswith("fastaphlict.server: stopped"), lines[-3:]
    assert any("state: wrote 1 message(s) of 1 instance(s)" in line for line in lines)
    assert not pidfile.exists(), "removed before the exit"
    assert len(list(state.glob("history-*.jsonl"))) == 1


#: Messages of 80 KB a stalled tab is sent before the SIGTERM.
MESSAGES = 100


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each whole unmasked frame in ``data``."""
    frames, at = [], 0
    while at + 2 <= len(data):
        size, head = data[at + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
        if at + head + size > len(data):
            break
        frames.append((data[at] & 0x0F, data[at + head : at + head + size]))
        at += head + size
    return frames


async def test_a_tab_that_has_not_read_yet_gets_everything_then_the_close_before_the_exit(
    tmp_path: Path,
) -> None:
    # Its socket holds more than the kernel takes: the stop must wait for it
    # to drain rather than leave those bytes to an exit that would drop them.
    # 8 MB is more than the kernel takes (its send buffer grows to 4 MiB at
    # most here), and under this server's slow-client cap.
    server = spawn(tmp_path / "server.log", f"--max-buffered={16 * 2**20}")
    try:
        server.wait_ready()
        tab = await stalled_websocket(server.client_port)
        padding = "x" * 80_000
        for n in range(MESSAGES):
            body = json.dumps({"key": n, "pad": padding, "subscribers": ["PHID-1"]}).encode()
            request = urllib.request.Request(
                f"{server.admin_url}/", body, {"Content-Type": PHORGE_CONTENT_TYPE}
            )
            with urllib.request.urlopen(request, timeout=scaled(5)) as answer:
                assert answer.status == 200
        server.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        data = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(tab, 1 << 16), TIMEOUT):
            data += chunk
        tab.close()
        assert server.proc.wait(SHUTDOWN) == 0, server.log()
    finally:
        server.stop()
    frames = _frames(bytes(data))
    assert [json.loads(p)["key"] for op, p in frames[:-1]] == list(range(MESSAGES))
    assert frames[-1][0] == 0x8 and frames[-1][1][:2] == (1001).to_bytes(2, "big"), frames[-1]
