"""The two-node cluster of docs/clusters.md, as written: Redis on a unix socket, two nodes, a post.

The start, check and stop blocks (``<!-- docs-test: two-node ... -->``) run
verbatim from the clone's root, the start block as one shell script (its
nodes are background jobs of it), the check block line by line with a
WebSocket tab of the test's own on node 2 between its lines. The example's
fixed ports (22280 to 22283) sit below Linux's ephemeral range, so no other
test, binding port 0, takes them. Whatever happens, everything the start
block started is stopped: by the documented stop command, then by the pids
it left (pidfiles, and the start script's process group for a node that
never wrote one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from docs_support import REPO, labelled, require_curl, runnable
from redis_support import require_redis
from support import TIMEOUT, Browser, child_env, eventually, exclusive, scaled

#: Where the example keeps everything; the test owns it while it runs.
DEMO = Path("/tmp/fastaphlict-demo")
PIDFILES = ("node1.pid", "node2.pid", "redis.pid")
NODE2_CLIENT = "ws://127.0.0.1:22282/"
PHID = "PHID-USER-demo"


def sh(script: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-e", "-c", runnable(script)],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        **options,  # type: ignore[arg-type]
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids() -> dict[str, int]:
    """The pid of every pidfile the example has written and not yet removed."""
    found = {}
    for name in PIDFILES:
        with contextlib.suppress(OSError, ValueError):
            found[name] = int((DEMO / name).read_text().strip())
    return found


def wait_gone(pids: set[int], within: float) -> set[int]:
    """Wait until none of ``pids`` runs; what still does after ``within`` s."""
    deadline = time.monotonic() + within
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextlib.contextmanager
def demo_cleaned_up(stop: str) -> Iterator[set[int]]:
    """A fresh :data:`DEMO`; afterwards, every process the example started is gone.

    Yields the set the test adds the start script's process group id to.
    """
    with exclusive("default-ports"), _cleaned_up(stop) as groups:
        yield groups


@contextlib.contextmanager
def _cleaned_up(stop: str) -> Iterator[set[int]]:
    if left := {pid for pid in pids().values() if alive(pid)}:
        pytest.fail(f"{DEMO} belongs to processes still running: {sorted(left)}")
    shutil.rmtree(DEMO, ignore_errors=True)
    groups: set[int] = set()
    try:
        yield groups
    finally:
        known = set(pids().values())
        if any(alive(pid) for pid in known):
            sh(stop, check=False)
        for pid in wait_gone(known, scaled(15)):
            os.kill(pid, signal.SIGKILL)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        wait_gone(known, scaled(5))
        shutil.rmtree(DEMO, ignore_errors=True)


@pytest.mark.timeout(120)
async def test_the_readme_two_node_cluster_runs_as_written() -> None:
    require_redis()
    require_curl()
    start, check, stop = (labelled(f"two-node {step}") for step in ("start", "check", "stop"))
    assert str(DEMO) in start.text and len(stop.commands) == 1
    healthz, broker_up, post, status = check.commands
    assert "/healthz" in healthz and "broker_up" in broker_up
    assert "--data" in post and ":22281/" in post and ":22283/status/" in status

    with demo_cleaned_up(stop.commands[0]) as groups:
        # The nodes are background jobs of the script: its process group is theirs.
        script = subprocess.Popen(
            ["sh", "-e", "-c", runnable(start.text)],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        groups.add(script.pid)
        out, _ = script.communicate(timeout=scaled(30))
        assert script.returncode == 0, f"{start.where()} exited {script.returncode}:\n{out}"

        def logs() -> str:
            return "".join(
                f"--- {log.name}\n{log.read_text(errors='replace')}"
                for log in sorted(DEMO.glob("*.log"))
            )

        done = sh(healthz)
        assert (done.returncode, done.stdout.split()) == (0, ["ok", "ok"]), f"{done}\n{logs()}"
        await eventually(lambda: len(pids()) == 3, TIMEOUT, "three pidfiles")
        started = set(pids().values())

        # A node that started before Redis answered joins when it does.
        up = "fastaphlict_broker_up 1.0\n" * 2
        await eventually(lambda: sh(broker_up).stdout == up, scaled(15), "broker_up 1 on both")

        async with connect(NODE2_CLIENT) as ws:
            tab = Browser(ws)
            await tab.subscribe(PHID)
            done = sh(post)
            node1 = re.search(r"fingerprint (\w{16})", (DEMO / "node1.log").read_text())
            assert node1 and done.returncode == 0, done
            assert done.stdout == f'{{"fingerprint":"{node1[1]}"}}', "node 1's receipt"
            message = await tab.recv()
            assert (message["key"], message["subscribers"]) == ("1", [PHID])
            assert message["touched"] == [node1[1]], "posted once, to node 1"

            done = sh(status)
            counted = json.loads(done.stdout)
            assert (counted["messages.in"], counted["history.size"]) == (1, 1), counted

            # "Never post one message to several nodes": each post is a new message.
            again = sh(post.replace(":22281/", ":22283/"))
            assert again.returncode == 0, again
            copy = await tab.recv()
            assert copy["key"] == "1" and copy["touched"] != message["touched"]

        async with connect(NODE2_CLIENT) as ws:
            late = Browser(ws)
            await late.subscribe(PHID)
            await late.send("replay", {"age": 60000})
            assert [(await late.recv())["touched"] for _ in range(2)] == [
                message["touched"],
                copy["touched"],
            ]

        done = sh(stop.commands[0])
        assert done.returncode == 0, done
        assert not wait_gone(started, scaled(15)), f"still running after the stop:\n{logs()}"
        assert not pids(), "every process removes its pidfile as it exits"
        assert "state: wrote 2 message(s)" in (DEMO / "node2.log").read_text()
