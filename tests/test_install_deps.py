"""``tests/install-deps.sh`` installs only what is missing, once; no root is no failure.

It runs here with stand-ins for ``id``, ``sudo`` and ``apt-get`` first on a
``PATH`` of their own, which record how they were called, and with
``INSTALL_DEPS_ROOT`` pointing at a scratch tree where each program of
:data:`PROGRAMS` exists or not.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from support import scaled

SCRIPT = Path(__file__).resolve().with_name("install-deps.sh")

#: Each Debian package the script installs, and where it puts the program checked for.
PROGRAMS = {
    "chromium": "usr/bin/chromium",
    "redis-server": "usr/bin/redis-server",
    "curl": "usr/bin/curl",
    "nginx": "usr/sbin/nginx",
    "logrotate": "usr/sbin/logrotate",
    "procps": "usr/sbin/sysctl",
}
ALL = " ".join(PROGRAMS)

#: Each stand-in logs ``name args... DEBIAN_FRONTEND=...`` to $CALLS.
STUB = '#!/bin/sh\necho "{name} $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}}" >> "$CALLS"\n'


def run(
    tmp_path: Path, *, present: tuple[str, ...], uid: int, sudo: bool, apt_fails: bool = False
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    root, bin_dir, calls = tmp_path / "root", tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for program in present:
        path = root / PROGRAMS[program]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    stubs = {
        "id": f'#!/bin/sh\n[ "$1" = "-u" ] && echo {uid}\n',
        "apt-get": STUB.format(name="apt-get") + ("exit 100\n" if apt_fails else ""),
    }
    if sudo:
        stubs["sudo"] = STUB.format(name="sudo") + 'exec "$@"\n'
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env_program = shutil.which("env")
    assert env_program is not None
    (bin_dir / "env").symlink_to(env_program)
    env = {"PATH": str(bin_dir), "CALLS": str(calls), "INSTALL_DEPS_ROOT": str(root)}
    done = subprocess.run(
        ["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=scaled(30)
    )
    logged = calls.read_text().splitlines() if calls.exists() else []
    return done, logged


UPDATE = "apt-get update -qq DEBIAN_FRONTEND="
INSTALL = "apt-get install -y -qq {} DEBIAN_FRONTEND=noninteractive"


def others(*absent: str) -> tuple[str, ...]:
    return tuple(p for p in PROGRAMS if p not in absent)


@pytest.mark.parametrize("uid", [0, 1000])
def test_nothing_runs_when_all_are_installed(tmp_path: Path, uid: int) -> None:
    done, calls = run(tmp_path, present=tuple(PROGRAMS), uid=uid, sudo=True)
    assert (done.returncode, calls, done.stderr) == (0, [], "")


@pytest.mark.parametrize(
    ("present", "packages"),
    [
        *[(others(program), program) for program in PROGRAMS],
        (others("chromium", "nginx"), "chromium nginx"),
        ((), ALL),
    ],
)
def test_as_root_it_installs_only_what_is_missing(
    tmp_path: Path, present: tuple[str, ...], packages: str
) -> None:
    done, calls = run(tmp_path, present=present, uid=0, sudo=False)
    assert done.returncode == 0, done.stderr
    assert calls == [UPDATE, INSTALL.format(packages)]


def test_through_sudo_non_interactively(tmp_path: Path) -> None:
    done, calls = run(tmp_path, present=(), uid=1000, sudo=True)
    assert done.returncode == 0, done.stderr
    assert calls == [
        "sudo apt-get update -qq DEBIAN_FRONTEND=",
        UPDATE,
        # DEBIAN_FRONTEND goes through sudo's env_reset inside the command.
        f"sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {ALL} DEBIAN_FRONTEND=",
        INSTALL.format(ALL),
    ]


def test_without_root_or_sudo_it_says_what_to_install_and_succeeds(tmp_path: Path) -> None:
    done, calls = run(tmp_path, present=others("redis-server"), uid=1000, sudo=False)
    assert (done.returncode, calls) == (0, [])
    assert "apt-get install redis-server)" in done.stderr
    assert "chromium" not in done.stderr.replace("install-deps:", "")
    assert "skipped" in done.stderr and "CI" in done.stderr


def test_a_failed_install_fails_the_script(tmp_path: Path) -> None:
    done, calls = run(tmp_path, present=others("nginx"), uid=0, sudo=False, apt_fails=True)
    assert done.returncode != 0
    assert calls == [UPDATE]
