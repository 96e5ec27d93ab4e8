"""systemd integration without libsystemd: socket activation and sd_notify.

Socket activation is what makes a restart lose nothing: systemd holds the
listening sockets, so connections and posts that arrive while the process
restarts wait in the listen backlog instead of being refused. This module
reads the ``LISTEN_*`` protocol (``sd_listen_fds(3)``), wraps the inherited
descriptors, and matches each to the configured server by its bound port.
``sd_notify(3)`` is one datagram to ``NOTIFY_SOCKET``.

It owns no listener: :mod:`fastaphlict.server` serves the sockets, and must
only ever ``close()`` them, never ``shutdown()``: the socket is shared with
systemd, and a shutdown would throw away the connections queued for the next
process. Nothing here raises for a missing systemd; without the variables
every function is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from fastaphlict.address import format_address
from fastaphlict.config import ServerConfig

__all__ = [
    "LISTEN_FDS_START",
    "ActivationError",
    "Inherited",
    "adopt",
    "inherited_sockets",
    "match",
    "notify",
    "parse_listen_env",
]

log = logging.getLogger("fastaphlict.systemd")

#: The first inherited descriptor; systemd passes them in order from here.
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """An inherited socket is unusable or matches no configured server."""


@dataclass(frozen=True)
class Inherited:
    """One listening socket handed over by systemd."""

    fd: int
    #: From ``LISTEN_FDNAMES`` (``FileDescriptorName=``); for log lines only.
    name: str
    host: str
    port: int
    sock: socket.socket | None = None

    def describe(self) -> str:
        """How log lines and errors name it: fd, systemd's name, address."""
        named = f" ({self.name})" if self.name and self.name != "unknown" else ""
        return f"fd {self.fd}{named} on {format_address(self.host, self.port)}"


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The inherited ``(fd, name)`` pairs meant for process ``pid``.

    Variables addressed to another process (our parent, say) mean nothing
    to us. Names that don't line up with the count are dropped, as
    ``sd_listen_fds_with_names`` drops them.
    """
    if environ.get("LISTEN_PID", "").strip() != str(pid) or "LISTEN_FDS" not in environ:
        return []
    raw = environ["LISTEN_FDS"].strip()
    if not raw.isdigit():
        raise ActivationError(f"LISTEN_FDS is not a count of sockets: {raw!r}")
    count = int(raw)
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def match(servers: Sequence[ServerConfig], found: Sequence[Inherited]) -> dict[int, Inherited]:
    """Each inherited socket's server, as ``{server index: socket}``, by bound port.

    The config's ``listen`` address is not compared: systemd chose the
    address. A socket that matches no server is an error, not a warning: it
    would hold a port that nobody serves, and connections would hang in its
    backlog.
    """
    by_port = {entry.port: index for index, entry in enumerate(servers)}
    assigned: dict[int, Inherited] = {}
    for item in found:
        index = by_port.get(item.port)
        if index is None or index in assigned:
            ports = ", ".join(f"{entry.type} {entry.port}" for entry in servers)
            raise ActivationError(
                f"inherited socket {item.describe()} matches no configured server "
                f"(configured: {ports or 'none'})"
            )
        assigned[index] = item
    return assigned


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[Inherited]:
    """Wrap the sockets systemd passed to this process; clear ``LISTEN_*``.

    The variables are cleared in every case (as ``sd_listen_fds(1)`` does)
    so that nothing this process starts believes the sockets are its own.
    """
    env = os.environ if environ is None else environ
    try:
        pairs = parse_listen_env(env, os.getpid() if pid is None else pid)
    finally:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    found = []
    for fd, name in pairs:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(
                f"inherited fd {fd} ({name}) is not a socket: {os.strerror(exc.errno or 0)}"
            ) from exc
        os.set_inheritable(fd, False)
        address = sock.getsockname()
        if (
            sock.family not in (socket.AF_INET, socket.AF_INET6)
            or sock.type != socket.SOCK_STREAM
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            raise ActivationError(
                f"inherited fd {fd} ({name}) at {address!r} is not a listening TCP socket"
            )
        found.append(Inherited(fd, name, address[0], address[1], sock))
    return found


def adopt(servers: Sequence[ServerConfig]) -> dict[int, Inherited]:
    """The inherited sockets of this process, matched to ``servers`` (see :func:`match`)."""
    found = inherited_sockets()
    try:
        return match(servers, found)
    except ActivationError:
        for item in found:
            if item.sock is not None:
                item.sock.close()
        raise


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to systemd.

    Returns whether a datagram went out. A failure is logged, never raised:
    a lost notification must not take the server down with it.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
