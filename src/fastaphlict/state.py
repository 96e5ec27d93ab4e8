"""The state directory: histories written at a graceful stop, read back at start.

A restart used to lose the last minute of messages: a tab that reconnects
after it asks for ``replay`` and got nothing. With ``--state-dir`` the server
writes every instance's history there after the going-away frames, and loads
it before any listener accepts, each entry with the wall-clock time it was
first accepted, so ``history.age`` and replay windows count on as if the
process had never stopped.

One file per instance, ``history-<sha256 of the name>.jsonl`` (browsers
choose instance names; a hash is always a valid file name). JSON lines: a
header naming the format, its version and the instance; one ``[at, payload]``
line per entry, oldest first, ``payload`` being the message's JSON text
exactly as it was framed; a trailer with the entry count, so a file cut at a
line boundary is still found truncated. Each file is written to a temporary
name, fsynced and renamed over the old one: a crash mid-write leaves the old
file or the new one, never half of one.

A file that cannot be read as this format (garbage, truncated, empty, another
version, a directory in its place) is renamed aside with a ``.bad-<time>``
suffix, kept for inspection, and logged in one line; the other files still
load and the server always starts. An entry that cannot be written (a
payload that is not UTF-8, an instance name with a lone surrogate, both
possible from another node through Redis) is skipped and logged; the rest
is saved. This module owns the files only: it never touches the hub's
instances itself.

The files hold subscriber PHIDs: each is created ``0600`` and a directory
this module creates is ``0700`` (an existing one keeps its mode, the
operator's choice: its files are ``0600`` whatever it is). One process at a
time: :func:`lock` holds ``lock`` in the directory for the process's life,
since a second process would delete the first one's files and, restoring
its pending messages, take its origin for its own.

``alive.json`` holds when the process was last known alive (written every
few seconds and at the stop): a broker node that starts while Redis is
unreachable delivers, on its first sync, what other nodes accepted after
that time (see :meth:`fastaphlict.broker.Broker.deliver_from`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson

__all__ = [
    "ALIVE_FILE",
    "FORMAT",
    "LOCK_FILE",
    "PENDING_FILE",
    "PENDING_FORMAT",
    "VERSION",
    "DirectoryInUse",
    "Pending",
    "StateDir",
    "StateError",
    "check_unlocked",
    "check_writable",
    "file_name",
    "lock",
    "read_alive",
    "read_dir",
    "read_pending",
    "remove_pending",
    "write_alive",
    "write_dir",
    "write_pending",
]

log = logging.getLogger("fastaphlict.state")

#: The header's ``format``: a file without it was not written by us.
FORMAT = "fastaphlict-history"
#: Bumped when the layout changes; other versions are set aside, not guessed at.
VERSION = 1
_PREFIX = "history-"
_SUFFIX = ".jsonl"

#: One entry: (wall-clock ms when first accepted, subscribers, payload bytes).
Entry = tuple[float, Any, bytes]

#: Messages accepted while Redis was unreachable and still unpublished at a
#: stop: one file, same layout (header, one line per message, trailer).
PENDING_FILE = "broker-pending.jsonl"
PENDING_FORMAT = "fastaphlict-broker-pending"
#: One pending message: (origin fingerprint, its sequence number at that
#: origin, instance, wall-clock ms when accepted, payload bytes). Origin and
#: number are kept so Redis can tell a message it already has.
Pending = tuple[str, int, str, float, bytes]


#: Held locked (flock) by the process that uses the directory.
LOCK_FILE = "lock"
#: When the process was last known alive (wall-clock ms).
ALIVE_FILE = "alive.json"
ALIVE_FORMAT = "fastaphlict-alive"
#: Files are created ``0600`` (subscriber PHIDs), a new directory ``0700``.
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


class StateError(ValueError):
    """A state file that is not a complete history in this format."""


class DirectoryInUse(OSError):
    """Another process holds the state directory's lock."""

    def __init__(self, directory: str, pid: str) -> None:
        super().__init__(
            f"state directory {directory} is in use by another fastaphlict process (pid {pid})"
        )


def file_name(instance: str) -> str:
    """The file that holds ``instance``'s history."""
    digest = hashlib.sha256(instance.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{_PREFIX}{digest[:32]}{_SUFFIX}"


def check_writable(directory: str) -> None:
    """Create ``directory`` (``0700``) if missing; raise OSError if files cannot be made in it.

    A file is made and removed: ``os.access`` says yes to root even where
    nothing can be created (a read-only mount).
    """
    os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    fd, probe = _create_temporary(os.path.join(directory, ".probe"))
    os.close(fd)
    os.unlink(probe)


def lock(directory: str) -> int:
    """Lock ``directory`` for this process; return the descriptor to keep open.

    Raises :class:`DirectoryInUse` when another process holds it. The lock
    goes with the process (or the descriptor's close), so a crash never
    leaves a stale one.
    """
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise DirectoryInUse(directory, holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _remove_leftovers(directory)
    return fd


#: A temporary file of :func:`_create_temporary` (or of versions before it).
_LEFTOVER = re.compile(r"\.(?:[0-9a-f]{12}|[0-9]+)\.tmp\Z")


def _remove_leftovers(directory: str) -> None:
    """Remove the temporary files a crash left mid-write; only the lock holder may.

    Nothing else writes here while the lock is held, so each is a leftover.
    """
    for name in os.listdir(directory):
        if _LEFTOVER.search(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                log.info("state: removed %s, left by a write a crash interrupted", name)


def check_unlocked(directory: str) -> None:
    """Raise :class:`DirectoryInUse` if a process holds ``directory``; creates nothing."""
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # never locked: whoever holds a lock made the file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        raise DirectoryInUse(directory, holder) from None
    finally:
        os.close(fd)


def encode(instance: str, entries: Iterable[Entry]) -> bytes:
    """One instance's history in the file format (see the module docstring).

    Entries that cannot be written are left out and logged; an instance
    name that cannot be raises ``ValueError``.
    """
    lines = [_dumps({"format": FORMAT, "version": VERSION, "instance": instance})]
    bad = 0
    problem: Exception | None = None
    for at, _, payload in entries:
        try:
            lines.append(_dumps([at, payload.decode("utf-8")]))
        except ValueError as exc:
            bad += 1
            problem = exc
    if bad:
        log.error(
            "state: %d message(s) of instance %r cannot be saved, skipped: %s",
            bad,
            instance,
            problem,
        )
    lines.append(orjson.dumps({"entries": len(lines) - 1}))
    return b"\n".join(lines) + b"\n"


def _dumps(value: Any) -> bytes:
    """orjson's dumps, raising ``ValueError`` for what JSON cannot hold (a lone surrogate)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:  # a TypeError: not what callers expect of data
        raise ValueError(str(exc)) from exc


def decode(data: bytes) -> tuple[str, list[Entry]]:
    """The instance and entries of one file; raise :class:`StateError` if it is not whole."""
    if not data.endswith(b"\n"):
        raise StateError("empty" if not data else "truncated (no final newline)")
    lines = data[:-1].split(b"\n")
    try:
        header = orjson.loads(lines[0])
    except orjson.JSONDecodeError as exc:
        raise StateError(f"not a state file: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateError("not a fastaphlict history file")
    if header.get("version") != VERSION:
        raise StateError(f"format version {header.get('version')!r}, expected {VERSION}")
    instance = header.get("instance")
    if not isinstance(instance, str):
        raise StateError("header names no instance")
    try:
        trailer = orjson.loads(lines[-1]) if len(lines) > 1 else None
        if not isinstance(trailer, dict) or trailer.get("entries") != len(lines) - 2:
            raise StateError("truncated (entry count does not match)")
        entries: list[Entry] = []
        for line in lines[1:-1]:
            at, text = orjson.loads(line)
            if not isinstance(at, (int, float)) or not isinstance(text, str):
                raise StateError("malformed entry")
            payload = text.encode("utf-8")
            message = orjson.loads(payload)
            subscribers = message.get("subscribers") if isinstance(message, dict) else None
            entries.append((float(at), subscribers, payload))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(f"malformed entry: {exc}") from exc
    return instance, entries


def _state_files(directory: str) -> Iterator[str]:
    for name in sorted(os.listdir(directory)):
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
            yield os.path.join(directory, name)


def read_dir(directory: str) -> Iterator[tuple[str, list[Entry]]]:
    """Every good history in ``directory``; bad files are set aside and logged once each."""
    for path in _state_files(directory):
        try:
            if os.path.isdir(path):
                raise StateError("a directory, not a file")
            with open(path, "rb") as f:
                data = f.read()
            yield decode(data)
        except (OSError, StateError) as exc:
            _set_aside(path, exc)


def _set_aside(path: str, problem: Exception) -> None:
    """Rename a bad state file out of the way, keeping it for inspection; one log line."""
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    reason = problem.strerror if isinstance(problem, OSError) else problem
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.error("state file %s is unusable (%s) and cannot be moved aside: %s", path, reason, exc)
        return
    log.warning(
        "state file %s is unusable (%s): moved to %s, history starts empty", path, reason, aside
    )


def write_dir(directory: str, histories: dict[str, list[Entry]]) -> int:
    """Replace the directory's histories with ``histories``; return the entries written.

    Files of instances not in ``histories`` are removed: their history was
    empty at the stop. An instance or message that cannot be written is
    skipped and logged. Raises OSError; the caller logs it.
    """
    os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    keep: set[str] = set()
    written = 0
    for instance, entries in histories.items():
        if not entries:
            continue
        try:
            data = encode(instance, entries)
        except ValueError as exc:
            log.error("state: instance %r cannot be saved, skipped: %s", instance, exc)
            continue
        name = file_name(instance)
        keep.add(name)
        _write_atomically(os.path.join(directory, name), data)
        written += data.count(b"\n") - 2
    for path in _state_files(directory):
        if os.path.basename(path) not in keep and not os.path.isdir(path):
            os.unlink(path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves survive a power cut
    finally:
        os.close(fd)
    return written


def write_pending(directory: str, pending: list[Pending]) -> None:
    """Write the broker's unpublished messages, replacing the file (none: remove it)."""
    path = os.path.join(directory, PENDING_FILE)
    if not pending:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    lines = [orjson.dumps({"format": PENDING_FORMAT, "version": VERSION})]
    for origin, seq, instance, at, payload in pending:
        try:
            lines.append(_dumps([origin, seq, instance, at, payload.decode("utf-8")]))
        except ValueError as exc:
            log.error(
                "state: unpublished message %s:%d of instance %r cannot be saved, skipped: %s",
                origin,
                seq,
                instance,
                exc,
            )
    lines.append(orjson.dumps({"entries": len(lines) - 1}))
    _write_atomically(path, b"\n".join(lines) + b"\n")


def remove_pending(directory: str) -> None:
    """Remove the pending file: every message in it is published."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, PENDING_FILE))


def write_alive(directory: str, at_ms: float, *, durable: bool = True) -> None:
    """Note that the process was alive at ``at_ms`` (wall clock)."""
    data = orjson.dumps({"format": ALIVE_FORMAT, "version": VERSION, "at": at_ms}) + b"\n"
    _write_atomically(os.path.join(directory, ALIVE_FILE), data, durable=durable)


def read_alive(directory: str) -> float | None:
    """When the previous process was last known alive; None if not known (logged if unreadable)."""
    path = os.path.join(directory, ALIVE_FILE)
    try:
        with open(path, "rb") as f:
            record = orjson.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("state file %s is unusable (%s): ignored", path, exc)
        return None
    if not isinstance(record, dict) or record.get("format") != ALIVE_FORMAT:
        at = None
    else:
        at = record.get("at")
    if not isinstance(at, (int, float)):
        log.warning("state file %s is unusable (not a %s record): ignored", path, ALIVE_FORMAT)
        return None
    return float(at)


def _create_temporary(prefix: str) -> tuple[int, str]:
    """A new ``0600`` file next to ``prefix``: never an existing file, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = f"{prefix}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(path, flags, FILE_MODE), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", prefix)


def _write_atomically(path: str, data: bytes, *, durable: bool = True) -> None:
    """``data`` at ``path`` whole or not at all: a temporary file, fsynced, renamed over."""
    fd, tmp = _create_temporary(path)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_pending(directory: str) -> list[Pending]:
    """The unpublished messages a previous stop left; the file stays until they are published.

    The caller removes it (:func:`remove_pending`) once Redis has them all:
    a crash or a stop before that finds them again at the next start (a
    repeat is refused by Redis). A damaged file is set aside like a bad
    history (one log line) and nothing is returned: a partial list could
    publish some messages twice.
    """
    path = os.path.join(directory, PENDING_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        _set_aside(path, exc)
        return []
    try:
        pending = _decode_pending(data)
    except StateError as exc:
        _set_aside(path, exc)
        return []
    return pending


def _decode_pending(data: bytes) -> list[Pending]:
    if not data.endswith(b"\n"):
        raise StateError("empty" if not data else "truncated (no final newline)")
    lines = data[:-1].split(b"\n")
    try:
        header = orjson.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != PENDING_FORMAT:
            raise StateError("not a fastaphlict pending-messages file")
        if header.get("version") != VERSION:
            raise StateError(f"format version {header.get('version')!r}, expected {VERSION}")
        trailer = orjson.loads(lines[-1]) if len(lines) > 1 else None
        if not isinstance(trailer, dict) or trailer.get("entries") != len(lines) - 2:
            raise StateError("truncated (entry count does not match)")
        pending: list[Pending] = []
        for line in lines[1:-1]:
            origin, seq, instance, at, text = orjson.loads(line)
            if not (
                isinstance(origin, str)
                and isinstance(seq, int)
                and isinstance(instance, str)
                and isinstance(at, (int, float))
                and isinstance(text, str)
            ):
                raise StateError("malformed entry")
            pending.append((origin, seq, instance, float(at), text.encode("utf-8")))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(f"malformed entry: {exc}") from exc
    return pending


# -- the directory of one running server ------------------------------------------

# These lines have always come from the server's logger; operators grep for them.
_server_log = logging.getLogger("fastaphlict.server")


class Histories(Protocol):
    """What :class:`StateDir` needs of the hub: its histories, out and in."""

    def import_state(self, instance: str, entries: list[Entry]) -> int: ...

    def export_state(self) -> dict[str, list[Entry]]: ...


class StateDir:
    """The state directory of one server, locked from :meth:`open` to :meth:`close`.

    Every failure to write is one error line, never an exception: the stop
    must go on to its end. Only opening (the directory cannot be written, or
    another process holds it) refuses the start.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: The lock, held for the process's life.
        self._lock_fd: int | None = None

    def open(self) -> float | None:
        """Create and lock the directory; return the last alive mark (ms), if any."""
        try:
            check_writable(self.path)
        except OSError as exc:
            raise OSError(
                f'state directory "{self.path}" can not be written: {_reason(exc)}'
            ) from exc
        # Before anything is read: a sibling's files are not ours to take.
        self._lock_fd = lock(self.path)
        return read_alive(self.path)

    def load_into(self, hub: Histories) -> None:
        """Load every saved history into ``hub``."""
        instances = entries = 0
        for name, saved in read_dir(self.path):
            loaded = hub.import_state(name, saved)
            instances += loaded > 0
            entries += loaded
        _server_log.info(
            "state: loaded %d message(s) of %d instance(s) from %s", entries, instances, self.path
        )

    def save(self, hub: Histories) -> bool:
        """Write every history of ``hub``; False (and one error line) if that failed."""
        try:
            histories = hub.export_state()
            written = write_dir(self.path, histories)
        except OSError as exc:
            _server_log.error("cannot write state to %s: %s", self.path, _reason(exc))
            return False
        except Exception:  # a boundary: the stop must go on to its end
            _server_log.exception("cannot write state to %s", self.path)
            return False
        _server_log.info(
            "state: wrote %d message(s) of %d instance(s) to %s",
            written,
            len(histories),
            self.path,
        )
        return True

    def note_alive(self, at_ms: float, *, durable: bool) -> None:
        """Note that messages up to ``at_ms`` were delivered (see :func:`write_alive`)."""
        try:
            write_alive(self.path, at_ms, durable=durable)
        except OSError as exc:
            _server_log.error("cannot write state to %s: %s", self.path, _reason(exc))

    def read_pending(self) -> list[Pending]:
        """What the previous process could not publish."""
        return read_pending(self.path)

    def keep_pending(self, pending: list[Pending]) -> bool:
        """Write what the broker could not publish (none: the file goes); False if that failed."""
        try:
            write_pending(self.path, pending)
        except Exception as exc:  # a boundary: the stop must go on to its end
            _server_log.error("cannot write state to %s: %s", self.path, exc)
            return False
        if pending:
            _server_log.warning(
                "broker: %d unpublished message(s) kept in %s for the next start",
                len(pending),
                self.path,
            )
        return True

    def remove_pending(self) -> None:
        """Every restored message is in Redis (or dropped): the saved file has done its job."""
        try:
            remove_pending(self.path)
        except OSError as exc:
            _server_log.error("cannot remove %s: %s", PENDING_FILE, _reason(exc))

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _reason(exc: OSError) -> str:
    """The system's words for a file's OSError."""
    return exc.strerror or str(exc)
