"""Debian's nginx in front of a test server: a scratch nginx.conf around a server block, run.

The README's nginx block (``<!-- docs-test: nginx -->``) goes into an
``http {}`` of a scratch nginx.conf with four words replaced: the two
certificate paths (by a throwaway CA's), the listen port 443 (by a free one
on loopback) and the client port 22280 (by the test server's). A test may
hand another block instead (the README's with a line removed or a timeout
changed) to build a broken proxy on purpose. Everything nginx writes goes
under the test's directory; :func:`nginx` runs it until the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import trustme

from docs_support import labelled
from support import require, scaled

__all__ = [
    "NGINX",
    "nginx",
    "nginx_command",
    "nginx_conf",
    "readme_block",
    "replace_once",
    "require_nginx",
]

#: Debian's nginx is in /usr/sbin, which a user's PATH may lack.
NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")


def require_nginx() -> str:
    require(
        NGINX is not None,
        "nginx is not installed (Debian: apt-get install nginx, or sh tests/install-deps.sh)",
        "the README's nginx block",
    )
    assert NGINX is not None
    return NGINX


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the nginx block should hold {old!r} once"
    return text.replace(old, new)


def readme_block() -> str:
    """The README's nginx block, as written."""
    return labelled("nginx").text


def nginx_conf(
    root: Path,
    pki: trustme.CA,
    listen: int,
    upstream: str,
    extra: str = "",
    block: str | None = None,
) -> Path:
    """A whole nginx.conf around ``block`` (the README's by default) under ``root``.

    ``upstream`` is what ``proxy_pass`` names instead of ``127.0.0.1:22280``;
    ``extra`` goes into the ``http`` block too. The certificate, issued by
    ``pki``, names ``phorge.example.com`` and ``127.0.0.1``.
    """
    block = readme_block() if block is None else block
    cert = pki.issue_cert("phorge.example.com", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "fullchain.pem"))
    for intermediate in cert.cert_chain_pems[1:]:
        intermediate.write_to_path(str(root / "fullchain.pem"), append=True)
    block = replace_once(
        block, "/etc/ssl/private/phorge.example.com.fullchain.pem", str(root / "fullchain.pem")
    )
    block = replace_once(block, "/etc/ssl/private/phorge.example.com.key", str(root / "key.pem"))
    block = replace_once(block, "listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;")
    block = replace_once(block, "http://127.0.0.1:22280;", f"http://{upstream};")
    temp = "\n".join(
        f"    {kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = root / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n    access_log {root}/access.log;\n{temp}\n{extra}{block}}}\n"
    )
    return conf


def nginx_command(conf: Path, *args: str) -> list[str]:
    root = conf.parent
    return [require_nginx(), "-p", f"{root}/", "-e", f"{root}/error.log", "-c", str(conf), *args]


@contextlib.contextmanager
def nginx(conf: Path, port: int) -> Iterator[None]:
    """nginx in the foreground until the block ends; it must be accepting on ``port``."""
    proc = subprocess.Popen(
        nginx_command(conf),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers too, should it need killing
    )
    try:
        deadline = time.monotonic() + scaled(15)
        while True:
            assert proc.poll() is None, (conf.parent / "error.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "nginx does not accept"
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master exits
        try:
            proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(scaled(5))
