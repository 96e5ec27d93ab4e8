"""``--state-dir``: history that outlives the process (issue 10, item 1).

Real processes: messages go in, the server gets SIGTERM, a new one starts on
the same directory, and a new tab's replay must find what the old one kept,
with the original timestamps. The 60 s window is tested with a state file
whose entries are already old, so nothing waits a minute and the production
rule stays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from fastaphlict import state
from fastaphlict.protocol import dumps
from support import (
    SRC,
    TIMEOUT,
    Browser,
    ServerProcess,
    child_env,
    launch,
    post,
    scaled,
    spawned,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def tab(server: ServerProcess, path: str = "/") -> AsyncIterator[Browser]:
    async with connect(f"{server.client_url}{path}", open_timeout=TIMEOUT) as ws:
        yield Browser(ws)


async def replayed(server: ServerProcess, path: str, *phids: str) -> list[Any]:
    """What a new tab subscribed to ``phids`` gets from a 60 s replay, in order."""
    async with tab(server, path) as browser:
        await browser.subscribe(*phids)
        await browser.send("replay", {"age": 60_000})
        await browser.send("ping", None)
        frames = []
        while (frame := await browser.recv()) != {"type": "pong"}:
            frames.append(frame)
        return frames


async def status(session: aiohttp.ClientSession, server: ServerProcess, instance: str) -> Any:
    async with session.get(f"{server.admin_url}/status/", params={"instance": instance}) as resp:
        assert resp.status == 200
        return await resp.json()


def saved(instance: str, *ages_ms: float) -> bytes:
    """A state file of ``instance`` with one message per age, oldest first."""
    now = time.time() * 1000
    entries = [
        (now - age, ["PHID-A"], dumps({"key": n, "subscribers": ["PHID-A"]}))
        for n, age in enumerate(ages_ms)
    ]
    return state.encode(instance, entries)


async def test_history_survives_a_restart_in_order_with_ages_that_kept_counting(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    server = launch(tmp_path / "server.log", f"--state-dir={state_dir}")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(server, session)
            for n in range(5):
                message = {"key": n, "subscribers": ["PHID-A", f"PHID-{n}"]}
                assert (await post(session, server.admin_url, message)).status == 200
                other = {"key": 100 + n, "subscribers": ["PHID-B"]}
                resp = await post(session, server.admin_url, other, instance="acme")
                assert resp.status == 200
            before = {
                "default": await replayed(server, "/", "PHID-A"),
                "acme": await replayed(server, "/~acme/", "PHID-B"),
            }
            assert [m["key"] for m in before["default"]] == list(range(5))
            assert [m["key"] for m in before["acme"]] == list(range(100, 105))
            sent = time.monotonic()
            old = {name: await status(session, server, name) for name in before}
            received = time.monotonic()

            server.stop()
            assert server.proc.returncode == 0, server.log()
            assert "state: wrote 10 message(s) of 2 instance(s)" in server.log()
            server = server.restart()
            await wait_healthy(server, session)
            assert "state: loaded 10 message(s) of 2 instance(s)" in server.log()

            assert await replayed(server, "/", "PHID-A") == before["default"]
            assert await replayed(server, "/~acme/", "PHID-B") == before["acme"]
            sent_again = time.monotonic()
            new = {name: await status(session, server, name) for name in before}
            received_again = time.monotonic()
            for name in before:
                assert new[name]["history.size"] == old[name]["history.size"] == 5
                kept_counting = new[name]["history.age"] - old[name]["history.age"]
                assert (sent_again - received) * 1000 - 2 <= kept_counting
                assert kept_counting <= (received_again - sent) * 1000 + 2
    finally:
        server.stop()


async def test_entries_older_than_the_window_are_not_loaded(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / state.file_name("default")).write_bytes(saved("default", 120_000, 61_000, 1_000))
    async with aiohttp.ClientSession() as session:
        with spawned(tmp_path / "server.log", f"--state-dir={state_dir}") as server:
            await wait_healthy(server, session)
            assert "state: loaded 1 message(s) of 1 instance(s)" in server.log()
            assert [m["key"] for m in await replayed(server, "/", "PHID-A")] == [2]
            assert (await status(session, server, "default"))["history.size"] == 1


def _truncated() -> bytes:
    whole = saved("bad", 1_000, 500)
    return whole[: whole.rstrip(b"\n").rindex(b"\n") + 1]  # cut at a line boundary


CORRUPTIONS = {
    "garbage": lambda path: path.write_bytes(b"\x00\xffnot json at all\n"),
    "truncated": lambda path: path.write_bytes(_truncated()),
    "empty": lambda path: path.write_bytes(b""),
    "foreign": lambda path: path.write_bytes(b'{"format":"fastaphlict-history","version":99}\n'),
    "directory": lambda path: path.mkdir(),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
async def test_a_bad_state_file_is_set_aside_and_the_server_delivers(
    tmp_path: Path, corruption: str
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / state.file_name("good")).write_bytes(saved("good", 1_000))
    bad = state_dir / state.file_name("bad")
    CORRUPTIONS[corruption](bad)
    async with aiohttp.ClientSession() as session:
        with spawned(tmp_path / "server.log", f"--state-dir={state_dir}") as server:
            await wait_healthy(server, session)
            complaints = [line for line in server.log().splitlines() if str(bad) in line]
            assert len(complaints) == 1, server.log()
            assert "moved to" in complaints[0]
            assert not bad.exists()
            assert [p.name for p in state_dir.iterdir() if ".bad-" in p.name]
            # Every good file still loads, and the server delivers.
            assert (await status(session, server, "good"))["history.size"] == 1
            async with tab(server) as browser:
                await browser.subscribe("PHID-A")
                await post(session, server.admin_url, {"key": 7, "subscribers": ["PHID-A"]})
                assert (await browser.recv())["key"] == 7


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastaphlict", *args],
        env={**child_env(), "PYTHONPATH": str(SRC), "CLIENT_PORT": "1", **env},
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )


def test_an_unwritable_state_dir_fails_test_and_start_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # root may write anywhere, but not under a regular file
    unwritable = str(blocker / "state")
    for result in (
        run_cli("--test", f"--state-dir={unwritable}"),
        run_cli("--test", FASTAPHLICT_STATE_DIR=unwritable),
        run_cli(f"--state-dir={unwritable}"),
    ):
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("fastaphlict: State directory ")
        assert "is not a directory" in result.stderr
    good = tmp_path / "not-yet"
    # The flag wins over the variable; --test creates nothing.
    result = run_cli("--test", f"--state-dir={good}", FASTAPHLICT_STATE_DIR=unwritable)
    assert result.returncode == 0, result.stderr
    assert not good.exists()


async def test_a_state_dir_that_breaks_before_the_stop_is_one_error_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    async with aiohttp.ClientSession() as session:
        server = launch(tmp_path / "server.log", f"--state-dir={state_dir}")
        try:
            await wait_healthy(server, session)
            assert state_dir.is_dir()  # created at start
            await post(session, server.admin_url, {"key": 1, "subscribers": ["PHID-A"]})
            shutil.rmtree(state_dir)  # its lock file with it
            state_dir.write_text("")  # a file where the directory was
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < scaled(5.0)
            assert server.proc.returncode == 0
            errors = [line for line in server.log().splitlines() if " ERROR " in line]
            assert len(errors) == 1 and "cannot write state" in errors[0], server.log()
        finally:
            server.stop()
    assert os.path.isfile(state_dir)


async def test_a_second_signal_skips_the_waits_but_still_writes_the_state(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    server = launch(tmp_path / "server.log", f"--state-dir={state_dir}")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(server, session)
            message = {"key": "kept", "subscribers": ["PHID-A"]}
            assert (await post(session, server.admin_url, message)).status == 200
            # A post whose body is still arriving: the first SIGTERM waits for it.
            _, writer = await asyncio.open_connection("127.0.0.1", server.admin_port)
            writer.write(
                b'POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":'
            )
            await writer.drain()
            await asyncio.sleep(scaled(0.2))
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(scaled(0.5))
            assert server.proc.poll() is None, "the first signal waits for the post"
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(scaled(2)) == 0, server.log()
            writer.close()
        assert "second SIGTERM: exiting without waiting" in server.log()
        assert "state: wrote 1 message(s) of 1 instance(s)" in server.log()
        server = server.restart()
        assert [m["key"] for m in await _replay_after_start(server)] == ["kept"]
    finally:
        server.stop()


async def _replay_after_start(server: ServerProcess) -> list[Any]:
    async with aiohttp.ClientSession() as session:
        await wait_healthy(server, session)
    return await replayed(server, "/", "PHID-A")


async def test_without_a_state_dir_nothing_is_written(tmp_path: Path) -> None:
    home = tmp_path / "cwd"
    home.mkdir()
    server = launch(tmp_path / "server.log")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(server, session)
            message = {"key": 1, "subscribers": ["PHID-A"]}
            assert (await post(session, server.admin_url, message)).status == 200
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert "state:" not in server.log()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "server.log"]


# -- the broker's unpublished messages (write_pending / read_pending) ------------------

PENDING: list[state.Pending] = [
    ("PreviousProcess1", 7, "default", 1_700_000_000_123.5, b'{"key":1,"subscribers":["PHID-A"]}'),
    (
        "PreviousProcess1",
        8,
        "acme \u2713",
        1_700_000_000_456.0,
        dumps({"text": "h\u00e9llo \u2713"}),
    ),
    ("OlderProcess0002", 1, "default", 1_700_000_000_000.0, b"[]"),
]


def test_pending_messages_round_trip_in_order_and_stay_until_removed(tmp_path: Path) -> None:
    state.write_pending(str(tmp_path), PENDING)
    assert [p.name for p in tmp_path.iterdir()] == [state.PENDING_FILE]
    assert state.read_pending(str(tmp_path)) == PENDING
    # Read is not published: a crash before Redis has them finds them again.
    assert state.read_pending(str(tmp_path)) == PENDING
    state.remove_pending(str(tmp_path))
    assert state.read_pending(str(tmp_path)) == []


def test_writing_no_pending_messages_removes_the_file(tmp_path: Path) -> None:
    state.write_pending(str(tmp_path), PENDING)
    state.write_pending(str(tmp_path), [])
    assert list(tmp_path.iterdir()) == []
    state.write_pending(str(tmp_path), [])  # and nothing to remove is fine too
    assert state.read_pending(str(tmp_path)) == []


def test_pending_messages_replace_the_previous_file(tmp_path: Path) -> None:
    state.write_pending(str(tmp_path), PENDING)
    state.write_pending(str(tmp_path), PENDING[:1])
    assert state.read_pending(str(tmp_path)) == PENDING[:1]


def test_pending_messages_leave_the_history_files_alone(tmp_path: Path) -> None:
    """write_dir() removes state files it does not know; the pending file is not one."""
    state.write_pending(str(tmp_path), PENDING)
    state.write_dir(str(tmp_path), {"default": [(1.0, [], b"{}")]})
    assert (tmp_path / state.PENDING_FILE).exists()
    assert [name for name, _ in state.read_dir(str(tmp_path))] == ["default"]


def _pending_file() -> bytes:
    lines = [
        b'{"format":"fastaphlict-broker-pending","version":1}',
        b'["PreviousProcess1",7,"default",1700000000123.5,"{}"]',
        b'{"entries":1}',
    ]
    return b"\n".join(lines) + b"\n"


PENDING_CORRUPTIONS = {
    "garbage": b"\x00\xffnot json at all\n",
    "truncated": _pending_file()[: _pending_file().rstrip(b"\n").rindex(b"\n") + 1],
    "no final newline": _pending_file()[:-1],
    "empty": b"",
    "foreign": b'{"format":"fastaphlict-history","version":1}\n{"entries":0}\n',
    "future version": _pending_file().replace(b'"version":1', b'"version":99'),
    "malformed entry": _pending_file().replace(b'"default"', b"42"),
    "short entry": _pending_file().replace(b',"{}"]', b"]"),
}


@pytest.mark.parametrize("corruption", PENDING_CORRUPTIONS)
def test_a_damaged_pending_file_is_set_aside_whole(
    tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of it is published: a partial list could publish some messages twice."""
    path = tmp_path / state.PENDING_FILE
    path.write_bytes(PENDING_CORRUPTIONS[corruption])
    assert state.read_pending(str(tmp_path)) == []
    assert not path.exists()
    [aside] = [p for p in tmp_path.iterdir() if ".bad-" in p.name]
    assert aside.name.startswith(state.PENDING_FILE)
    assert aside.read_bytes() == PENDING_CORRUPTIONS[corruption], "kept for inspection"
    complaints = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(complaints) == 1 and "moved to" in complaints[0].getMessage()


def test_the_sample_pending_file_is_good(tmp_path: Path) -> None:
    """The corruptions above break a file that reads."""
    (tmp_path / state.PENDING_FILE).write_bytes(_pending_file())
    assert state.read_pending(str(tmp_path)) == [
        ("PreviousProcess1", 7, "default", 1700000000123.5, b"{}")
    ]


def test_a_pending_file_that_is_a_directory_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / state.PENDING_FILE).mkdir()
    assert state.read_pending(str(tmp_path)) == []
    assert not (tmp_path / state.PENDING_FILE).exists()
