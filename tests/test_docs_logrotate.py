"""The logrotate entry of docs/operations.md, run by a real logrotate against a real server's log.

The entry (``<!-- docs-test: logrotate -->``) is used as written with its
paths moved under a scratch directory and its ``su`` naming the user running
the tests (there is no ``fastaphlict`` user here). Two forced rotations: the
first moves the live log to ``.1`` and the ``postrotate`` signals the server
through its pidfile (logrotate fails if that ``kill`` does), the second
compresses ``.1`` (``delaycompress``); the server keeps logging to a fresh
file throughout.
"""

from __future__ import annotations

import grp
import gzip
import os
import pwd
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from docs_support import labelled
from support import require, scaled, spawn

#: Debian's logrotate is in /usr/sbin, which a user's PATH may lack.
LOGROTATE = shutil.which("logrotate", path="/usr/sbin:/usr/bin:/sbin:/bin")


REJECTED = "rejected post"


def rejected_post(admin_url: str) -> None:
    """One log line: the server logs every post it rejects (here, a body that is not JSON)."""
    request = urllib.request.Request(f"{admin_url}/", data=b"not json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=scaled(5))
    assert refused.value.code == 400


def logrotate(conf: Path, state: Path) -> None:
    assert LOGROTATE is not None
    done = subprocess.run(
        [LOGROTATE, "--force", "--state", str(state), str(conf)],
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_logrotate_entry_rotates_a_live_servers_log(tmp_path: Path) -> None:
    require(
        LOGROTATE is not None,
        "logrotate is not installed (Debian: apt-get install logrotate,"
        " or sh tests/install-deps.sh)",
        "the logrotate entry of docs/operations.md",
    )
    logs, run = tmp_path / "log", tmp_path / "run"
    logs.mkdir(mode=0o755)
    run.mkdir()
    entry = labelled("logrotate").text
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    for old, new in (
        ("/var/log/fastaphlict/", f"{logs}/"),
        ("/run/fastaphlict/aphlict.pid", f"{run}/aphlict.pid"),
        ("su fastaphlict fastaphlict", f"su {user} {group}"),
    ):
        assert old in entry, f"the logrotate entry no longer names {old!r}"
        entry = entry.replace(old, new)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(entry)
    log = logs / "aphlict.log"
    config = {"logs": [{"path": str(log)}], "pidfile": str(run / "aphlict.pid")}
    with spawn(tmp_path / "server.out", config=config) as server:
        server.wait_ready()
        assert (run / "aphlict.pid").read_text().strip() == str(server.pid)
        rejected_post(server.admin_url)
        assert log.read_text().count(REJECTED) == 1

        logrotate(conf, tmp_path / "state")
        assert (logs / "aphlict.log.1").read_text().count(REJECTED) == 1
        rejected_post(server.admin_url)
        rejected_post(server.admin_url)
        assert log.read_text().count(REJECTED) == 2, "the server writes to a fresh file"

        logrotate(conf, tmp_path / "state")
        with gzip.open(logs / "aphlict.log.2.gz", "rt") as oldest:
            assert oldest.read().count(REJECTED) == 1
        assert (logs / "aphlict.log.1").read_text().count(REJECTED) == 2
        rejected_post(server.admin_url)
        assert log.read_text().count(REJECTED) == 1
        assert server.proc.poll() is None, "SIGHUP reopens the logs; it does not stop the server"
