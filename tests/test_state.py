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
import gc
import logging
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
import orjson
import pytest
from websockets.asyncio.client import connect

from fastaphlict import state
from fastaphlict.config import Limits, Settings, parse_broker_url
from fastaphlict.process import paused_gc
from fastaphlict.protocol import dumps
from support import (
    SRC,
    TIMEOUT,
    Browser,
    ServerProcess,
    child_env,
    free_ports,
    post,
    run,
    scaled,
    settings,
    spawn,
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
    server = spawn(tmp_path / "server.log", f"--state-dir={state_dir}")
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
        with spawn(tmp_path / "server.log", f"--state-dir={state_dir}") as server:
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
        with spawn(tmp_path / "server.log", f"--state-dir={state_dir}") as server:
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
        server = spawn(tmp_path / "server.log", f"--state-dir={state_dir}")
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
    server = spawn(tmp_path / "server.log", f"--state-dir={state_dir}")
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
    server = spawn(tmp_path / "server.log")
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


# -- one process per directory (the lock) ---------------------------------------------


async def test_a_second_process_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    """It would delete the first one's files, and take its pending messages' origin."""
    state_dir = tmp_path / "state"
    async with aiohttp.ClientSession() as session:
        with spawn(tmp_path / "first.log", f"--state-dir={state_dir}") as first:
            await wait_healthy(first, session)
            await post(session, first.admin_url, {"key": "first", "subscribers": ["PHID-A"]})
            client, admin = free_ports(2)
            ports = {"CLIENT_PORT": str(client), "ADMIN_PORT": str(admin)}
            for result in (
                run_cli("--test", f"--state-dir={state_dir}", **ports),
                run_cli(f"--state-dir={state_dir}", LISTEN_ADDR="127.0.0.1", **ports),
            ):
                assert result.returncode == 1, result
                assert result.stderr == (
                    f"fastaphlict: state directory {state_dir} is in use by another"
                    f" fastaphlict process (pid {first.pid})\n"
                )
            first.stop()
        assert "state: wrote 1 message(s)" in first.log()


async def test_the_lock_also_holds_against_a_start_that_raced_past_the_check(
    tmp_path: Path,
) -> None:
    held = state.lock(str(tmp_path))
    try:
        state.write_pending(str(tmp_path), PENDING)
        with pytest.raises(state.DirectoryInUse, match=f"state directory {tmp_path} is in use"):
            async with run(settings(state_dir=str(tmp_path))):
                pass
        assert state.read_pending(str(tmp_path)) == PENDING, "the holder's file untouched"
    finally:
        os.close(held)
    # Released with its descriptor (or its process): no stale lock after a crash.
    async with run(settings(state_dir=str(tmp_path))):
        pass


async def test_state_loads_and_saves_with_the_collector_paused_and_back_on_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of acyclic entries: collections during the load or the save find nothing."""
    seen: list[tuple[str, bool]] = []
    load, save = state.StateDir.load_into, state.StateDir.save

    def loading(self: state.StateDir, hub: Any) -> None:
        seen.append(("load", gc.isenabled()))
        load(self, hub)

    def saving(self: state.StateDir, hub: Any) -> bool:
        seen.append(("save", gc.isenabled()))
        return save(self, hub)

    monkeypatch.setattr(state.StateDir, "load_into", loading)
    monkeypatch.setattr(state.StateDir, "save", saving)
    (tmp_path / state.file_name("default")).write_bytes(saved("default", 1_000))
    assert gc.isenabled()
    async with run(settings(state_dir=str(tmp_path))) as srv:
        assert gc.isenabled()
        assert srv.hub.status("default")["history.size"] == 1, "loaded"
    assert seen == [("load", False), ("save", False)]
    assert gc.isenabled()
    assert len(state.decode((tmp_path / state.file_name("default")).read_bytes())[1]) == 1


def test_pausing_the_collector_leaves_one_that_was_off_off() -> None:
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled(), "an embedding application's choice is kept"
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError
    assert gc.isenabled(), "back on after a failure"


# -- what the files may hold, and who may read them ----------------------------------------


def test_state_files_are_private_and_a_new_directory_too(tmp_path: Path) -> None:
    """They hold subscriber PHIDs: 0600 and 0700, whatever the umask."""
    directory = tmp_path / "new" / "state"
    old = os.umask(0o022)
    try:
        state.check_writable(str(directory))
        state.write_dir(str(directory), {"default": [(time.time() * 1000, [], b"{}")]})
        state.write_pending(str(directory), PENDING)
        state.write_alive(str(directory), 1.0)
        os.close(state.lock(str(directory)))
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert modes == {
        state.file_name("default"): 0o600,
        state.PENDING_FILE: 0o600,
        state.ALIVE_FILE: 0o600,
        state.LOCK_FILE: 0o600,
    }


def test_a_message_or_instance_that_cannot_be_saved_is_skipped_and_the_rest_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both can come from another node through Redis: raw bytes, a surrogate-escaped name."""
    now = time.time() * 1000
    histories = {
        "good": [(now, [], b'{"key":1}'), (now, [], b'{"key":"\xff"}'), (now, [], b'{"key":2}')],
        "bad \udc80": [(now, [], b'{"key":3}')],
    }
    assert state.write_dir(str(tmp_path), histories) == 2
    assert [
        (name, [p for _, _, p in entries]) for name, entries in state.read_dir(str(tmp_path))
    ] == [("good", [b'{"key":1}', b'{"key":2}'])]
    pending = [
        ("Origin0000000001", 1, "good", now, b'{"key":"\xff"}'),
        ("Origin0000000001", 2, "bad \udc80", now, b"{}"),
        ("Origin0000000001", 3, "good", now, b"{}"),
    ]
    state.write_pending(str(tmp_path), pending)
    assert state.read_pending(str(tmp_path)) == [pending[2]]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 4 and all("cannot be saved, skipped" in e for e in errors), errors


def on_a_broker_to_nowhere(state_dir: Path) -> Settings:
    """A node keeping its state in ``state_dir``, on a broker nothing listens for."""
    broker = parse_broker_url(f"redis://127.0.0.1:{free_ports(1)[0]}/0")
    return settings(state_dir=str(state_dir), broker=broker, limits=Limits(broker_timeout=0.2))


async def test_a_message_that_cannot_be_saved_does_not_stop_the_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's drain and the pending save still run, and the good histories are saved."""
    caplog.set_level(logging.INFO, "fastaphlict")
    async with run(on_a_broker_to_nowhere(tmp_path)) as srv:
        server = srv.server
        now = time.time() * 1000
        server.hub.merge("good", [(now, b'{"key":"\xff"}', False)])
        server.hub.merge("bad \udc80", [(now, b'{"key":1}', False)])
        server.hub.publish("good", {"key": "kept", "subscribers": ["PHID-A"]})
    [(name, entries)] = list(state.read_dir(str(tmp_path)))
    assert name == "good" and [orjson.loads(p)["key"] for _, _, p in entries] == ["kept"]
    [(_, _, instance, _, payload)] = state.read_pending(str(tmp_path))
    assert instance == "good" and orjson.loads(payload)["key"] == "kept"
    assert "state: wrote 1 message(s)" in caplog.text


async def test_at_a_stop_unpublished_messages_are_written_before_the_histories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They can be recovered from nowhere else: a kill amid many histories must not lose them."""
    order: list[str] = []
    for name in ("write_pending", "write_dir"):
        real = getattr(state, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            order.append(_name)
            return _real(*args)

        monkeypatch.setattr(state, name, spy)
    async with run(on_a_broker_to_nowhere(tmp_path)) as srv:
        server = srv.server
        server.hub.publish("default", {"key": "kept", "subscribers": ["PHID-A"]})
    assert order == ["write_pending", "write_dir"]
    assert len(state.read_pending(str(tmp_path))) == 1


async def test_saved_messages_stay_on_disk_until_redis_has_them(tmp_path: Path) -> None:
    """Read at start is not published: a crash or a stop before Redis is back loses nothing."""
    recent = [(o, s, i, time.time() * 1000 - 1000, p) for o, s, i, _, p in PENDING]
    state.write_pending(str(tmp_path), recent)
    async with run(on_a_broker_to_nowhere(tmp_path)):
        assert state.read_pending(str(tmp_path)) == recent, "still there while Redis is away"
    assert state.read_pending(str(tmp_path)) == recent


async def test_saved_messages_all_past_the_window_are_removed_at_start(tmp_path: Path) -> None:
    state.write_pending(str(tmp_path), PENDING)  # from 2023: long expired
    async with run(on_a_broker_to_nowhere(tmp_path)):
        assert not (tmp_path / state.PENDING_FILE).exists()
    assert not (tmp_path / state.PENDING_FILE).exists()


def test_the_alive_time_round_trips_and_a_bad_one_is_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert state.read_alive(str(tmp_path)) is None
    state.write_alive(str(tmp_path), 1_700_000_000_123.5)
    assert state.read_alive(str(tmp_path)) == 1_700_000_000_123.5
    for bad in (b"", b"[]", b'{"format":"other","at":1}', b'{"format":"fastaphlict-alive"}'):
        (tmp_path / state.ALIVE_FILE).write_bytes(bad)
        assert state.read_alive(str(tmp_path)) is None
    assert caplog.text.count("is unusable") == 4


def test_the_lock_holder_removes_what_a_crash_left_mid_write(tmp_path: Path) -> None:
    """A kill -9 between creating a temporary file and renaming it leaves it behind."""
    left = [f"{state.PENDING_FILE}.0123456789ab.tmp", f"{state.file_name('x')}.4242.tmp"]
    kept = [state.PENDING_FILE, "notes.tmp", "history-x.jsonl.tmp.bak"]
    for name in (*left, *kept):
        (tmp_path / name).write_bytes(b"x")
    os.close(state.lock(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, state.LOCK_FILE])
