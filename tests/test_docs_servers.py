"""The README's commands that start one server, run as written: quick start, migrating, broker.

*Quick start*: ``.venv/bin/fastaphlict`` serves on the embedded defaults and
Ctrl-C stops it. *Migrating from Aphlict*: step 1 checks the example config
of ``docs/settings.md``, step 4 starts a server on it, step 5's ``curl``
reads Aphlict's ``/status/`` keys, and the rollback's SIGTERM leaves no
pidfile behind. *A cluster in short*: the ``FASTAPHLICT_BROKER=...
fastaphlict --config=...`` line starts a node that reaches a real Redis as
the user and password of its URL.

What moves, and only that: the install path ``/opt/fastaphlict/venv/bin/``
(read as this interpreter's bin directory), the placeholder config paths
(a scratch file holding the documented config, with its log and pidfile
paths under a scratch directory and its client on loopback), and the
broker's host (a throwaway Redis on a free port).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from docs_support import (
    CONTRIB,
    INSTALLED,
    REPO,
    all_blocks,
    labelled,
    paths_under,
    require_curl,
    runnable,
)
from redis_support import RedisServer
from support import SHUTDOWN, STARTUP, child_env, eventually, exclusive, free_ports, scaled

#: The keys of Aphlict's ``/status/``, which Phorge's Notification Servers page reads.
STATUS_KEYS = {
    "instance",
    "uptime",
    "clients.active",
    "clients.total",
    "messages.in",
    "messages.out",
    "history.size",
    "history.age",
    "version",
}


def installed(command: str) -> str:
    """The command with the documented install path read as this interpreter's bin directory."""
    return runnable(command.replace(INSTALLED, ".venv/bin/"))


def moved(config: dict[str, object], root: Path) -> str:
    """``config`` as JSON, its absolute paths under ``root`` and its client on loopback."""
    return paths_under(json.dumps(config).replace('"0.0.0.0"', '"127.0.0.1"'), root)


def readme_config() -> dict[str, object]:
    """The example config of ``docs/settings.md``, which the migration steps point at."""
    (config,) = [
        json.loads(b.text)
        for b in all_blocks()
        if b.path.name == "settings.md" and b.language == "json" and '"servers"' in b.text
    ]
    return config


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(2)) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


@contextlib.contextmanager
def foreground(command: str, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """``command`` as a terminal would run it; whatever it started is killed afterwards."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", command],
            cwd=REPO,
            env={**child_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(scaled(5))


async def stopped_by_sigterm(pidfile: Path, log: Path) -> None:
    """SIGTERM to the pid of ``pidfile``: the server exits and removes its pidfile."""
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    await eventually(lambda: not Path(f"/proc/{pid}").exists(), SHUTDOWN, "the server's exit")
    assert not pidfile.exists(), log.read_text()
    assert "stopped" in log.read_text()


@pytest.mark.timeout(90)
async def test_the_quick_start_serves_on_the_defaults_until_ctrl_c(tmp_path: Path) -> None:
    """The second line, ``.venv/bin/fastaphlict`` alone: client on 22280, admin on 22281.

    SIGINT stops it. The first line, the install, is CI's own install
    (``test_docs.test_the_quick_start_installs_as_ci_does``).
    """
    _, command = labelled("quickstart start").commands
    log = tmp_path / "server.log"
    with exclusive("default-ports"), log.open("ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", runnable(command)],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            admin, client = "http://127.0.0.1:22281", "http://127.0.0.1:22280"
            await eventually(lambda: http_get(f"{admin}/healthz")[0] == 200, STARTUP, "/healthz")
            assert http_get(f"{client}/") == (501, "HTTP/501 Use Websockets\n")
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
            await eventually(lambda: "stopped" in log.read_text(), SHUTDOWN, "the stop")
            await eventually(lambda: http_get(f"{admin}/healthz")[0] == 0, SHUTDOWN, "ports")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(scaled(5))


@pytest.mark.timeout(90)
async def test_the_migration_steps_run_as_written(tmp_path: Path) -> None:
    require_curl()
    check, start, status = (labelled(f"migrate {step}") for step in ("check", "start", "status"))
    config_path = tmp_path / "aphlict.custom.json"
    config_path.write_text(moved(readme_config(), tmp_path))

    def ours(block_command: str) -> str:
        return installed(
            re.sub(r"/path/to/\S*aphlict\.custom\.json", str(config_path), block_command)
        )

    (command,) = check.commands
    done = sh(ours(command))
    assert (done.returncode, done.stdout) == (0, "Configuration test OK.\n"), done.stderr

    (command,) = start.commands
    (curl,) = status.commands
    admin = re.search(r"http://127\.0\.0\.1:(\d+)/", curl)
    assert admin and int(admin[1]) in {s["port"] for s in readme_config()["servers"]}  # type: ignore[attr-defined,index]
    log = tmp_path / "server.log"
    with exclusive("default-ports"), foreground(ours(command), log):
        await eventually(lambda: sh(curl).stdout.startswith("{"), STARTUP, "step 5's status")
        answer = json.loads(sh(curl).stdout)
        assert answer.keys() == STATUS_KEYS and answer["version"] == 8, answer
        # Phorge's check of a client server: a plain request answered 501.
        assert http_get("http://127.0.0.1:22280/") == (501, "HTTP/501 Use Websockets\n")
        pidfile = tmp_path / readme_config()["pidfile"].lstrip("/")  # type: ignore[attr-defined]
        await stopped_by_sigterm(pidfile, log)


@pytest.mark.timeout(90)
async def test_the_broker_command_starts_a_node_that_reaches_redis(tmp_path: Path) -> None:
    """The broker URL's user and password, given through the variable, get the node in."""
    (command,) = labelled("broker start").commands
    url = re.search(r"FASTAPHLICT_BROKER='redis://(\w+):(\w+)@([\w.]+:\d+)/0'", command)
    assert url, command
    user, password, where = url.groups()
    acl = ["--user", user, "on", f">{password}", "~*", "&*", "+@all"]
    config = json.loads((CONTRIB / "aphlict.example.json").read_text())
    client, admin = free_ports(2)
    config["servers"][0]["port"], config["servers"][1]["port"] = client, admin
    config_path = tmp_path / "aphlict.json"
    config_path.write_text(moved(config, tmp_path))
    with RedisServer(tmp_path / "redis", args=acl) as redis:
        ours = command.replace(where, f"127.0.0.1:{redis.port}")
        ours = installed(ours.replace("/etc/fastaphlict/aphlict.json", str(config_path)))
        log = tmp_path / "server.log"
        with foreground(ours, log):
            metrics = f"http://127.0.0.1:{admin}/metrics"
            up = "\nfastaphlict_broker_up 1.0\n"
            await eventually(lambda: up in http_get(metrics)[1], STARTUP, "broker_up 1")
            await stopped_by_sigterm(tmp_path / "run/fastaphlict/aphlict.pid", log)
    assert password not in log.read_text()
