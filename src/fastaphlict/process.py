"""The process: its pidfile, its open-file limit, its garbage collector.

What a server process does to itself and its environment apart from
listening: nothing here knows of the hub or the listeners.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import Iterator

from fastaphlict.config import Limits, unsafe_directory

__all__ = [
    "PidFile",
    "PidFileError",
    "connection_cap",
    "is_server_command",
    "os_reason",
    "paused_gc",
    "raise_open_file_limit",
    "tune_gc",
]

# The server's logger: these lines have always come from it, and operators grep for it.
log = logging.getLogger("fastaphlict.server")


class PidFile:
    """Aphlict's pidfile, without its classic traps.

    A pidfile left behind by a crash or a reboot used to block Aphlict from
    starting. Here a pidfile whose process is gone, or is not an Aphlict or
    a fastaphlict (after a reboot the number may belong to anything), is
    replaced with a warning; only a live server refuses the start.

    Phorge's default place, ``/var/tmp/aphlict/pid/``, may have been made
    first by any local user: a directory another user owns (or may write,
    without the sticky bit) is refused, and the file is written through a
    new temporary file that is never an existing one nor a symlink.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self) -> None:
        """Raise :class:`PidFileError` if a live server owns the pidfile, or it is unsafe."""
        problem = unsafe_directory(os.path.dirname(os.path.abspath(self.path)))
        if problem:
            raise PidFileError(f"refusing pidfile {self.path}: {problem}")
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PidFileError(f"cannot read pidfile {self.path}: {exc.strerror}") from exc
        pid = int(text) if text.isdigit() else 0
        if pid and pid != os.getpid() and _is_server(pid):
            raise PidFileError(
                f"pidfile {self.path} names process {pid}, which is still running: "
                "is another fastaphlict using this config? Stop it first, or give each"
                " process its own --pidfile."
            )
        log.warning(
            "replacing stale pidfile %s (process %s is gone or is not aphlict nor fastaphlict)",
            self.path,
            text or "?",
        )

    def write(self) -> None:
        """Write our pid atomically (creating the directory), never through a symlink."""
        directory = os.path.dirname(os.path.abspath(self.path))
        problem = unsafe_directory(directory)
        if problem:
            raise PidFileError(f"refusing pidfile {self.path}: {problem}")
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(  # O_CREAT | O_EXCL | O_NOFOLLOW, a random name
                prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
            )
        except OSError as exc:
            raise PidFileError(f"cannot write pidfile {self.path}: {os_reason(exc)}") from exc
        try:
            with open(fd, "w") as f:
                os.fchmod(fd, 0o644)  # readable by the tools that read it, as Aphlict's
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, self.path)  # replaces a symlink there, never its target
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidFileError(f"cannot write pidfile {self.path}: {os_reason(exc)}") from exc

    def remove(self) -> None:
        """Remove the pidfile if it is still ours."""
        try:
            with open(self.path) as f:
                if f.read().strip() != str(os.getpid()):
                    return
            os.unlink(self.path)
        except OSError:
            pass


class PidFileError(OSError):
    """The pidfile cannot be used: a live server owns it, or it cannot be written safely."""


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is alive and an Aphlict or a fastaphlict (see :func:`is_server_command`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # alive and unreadable: assume the worst, refuse
    return is_server_command(cmdline.rstrip(b"\0").split(b"\0"))


def is_server_command(argv: list[bytes]) -> bool:
    """Whether a command line is Aphlict (node running ``aphlict_server.js``) or fastaphlict.

    Not any command that merely mentions aphlict (``tail -f aphlict.log``):
    the program, or the script or module an interpreter runs, must be one.
    """
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if program.startswith(b"fastaphlict"):
        return True
    if program in (b"node", b"nodejs"):
        return any(os.path.basename(arg) == b"aphlict_server.js" for arg in argv[1:])
    if program.startswith(b"python"):
        words = iter(argv[1:])
        for arg in words:
            if arg in (b"-X", b"-W"):
                next(words, None)  # the option's argument (-X dev, -W ignore)
            elif arg == b"-m":
                return next(words, None) == b"fastaphlict"
            elif arg == b"-c":
                return False
            elif not arg.startswith(b"-"):
                return os.path.basename(arg).startswith(b"fastaphlict")
    return False


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: each browser tab is a socket.

    With the common soft default of 1024 the server would stop accepting at
    about a thousand tabs while the hard limit allows far more.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            return
    log.info("open-file limit %d", hard)


def connection_cap(limits: Limits) -> int:
    """The configured cap, or the open-file limit less a reserve for logs and peers."""
    if limits.max_connections:
        return limits.max_connections
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft - 256, 64)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside the block (one that was off stays off).

    For bulk work that builds many objects and leaves no cycles: loading or
    writing the state directory at a restart (40960 messages: the
    collections the allocations triggered were half the load's time, and
    found nothing). Reference counting still frees what the block drops.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def tune_gc() -> None:
    """Keep the cyclic GC off the hot path.

    Everything built at start-up is frozen out of collections, and the young
    generation is collected every 50000 allocations instead of 700: a publish
    allocates a few dozen short-lived, acyclic objects, and the default turned
    that into a collection every few messages (about 2% of server CPU in the
    targeted benchmark's profile).
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(50_000, second, third)


def os_reason(exc: OSError) -> str:
    """The system's words for an OSError, without the address tuple uvloop adds."""
    return os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
