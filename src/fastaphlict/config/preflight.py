"""Preflight: the only I/O of configuration, shared by ``--test`` and start.

It checks that the TLS files are readable and load (keys, certificates,
chains and CA files, through :mod:`~fastaphlict.config.tls`, as the server
will load them), that a file can be made where the pidfile, the logs and the
state go (a probe, removed at once) and that every ``listen`` resolves. It
never binds, never starts anything, and nothing it makes outlives the check.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile

from fastaphlict.config.aphlict import _SSL_KEYS, Config
from fastaphlict.config.errors import ConfigError
from fastaphlict.config.settings import Settings
from fastaphlict.config.tls import client_context, server_context

__all__ = [
    "check_broker_ca",
    "check_files",
    "check_listen",
    "check_state_dir",
    "check_tls",
    "preflight",
    "unsafe_directory",
]


def check_files(config: Config, *, pidfile_from: str | None = None) -> None:
    """For ``--test`` and start: fail now, on the console, rather than later at bind time.

    Nothing is created: a log or pidfile path only has to be one that could be.
    ``pidfile_from`` names the flag or variable that replaced the file's
    ``pidfile``, since that is where the operator has to fix it.
    """
    for index, server in enumerate(config.servers):
        for key, path in zip(
            _SSL_KEYS, (server.ssl_key, server.ssl_cert, server.ssl_chain), strict=True
        ):
            if path is None:
                continue
            try:
                # Opening proves existence, permission and not-a-directory at once.
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f'Server (at index "{index}", on port "{server.port}") has "{key}" '
                    f'set to "{path}", which can not be read: {exc.strerror or exc}.'
                ) from exc
    for index, log in enumerate(config.logs):
        problem = _uncreatable_directory(log.path)
        if problem:
            directory = os.path.dirname(log.path)
            raise ConfigError(
                f'Failed to create directory "{directory}" for specified log file '
                f'(with index "{index}"). You should manually create this directory '
                f"or choose a different logfile location. {problem}."
            )
        problem = _unwritable_file(log.path)
        if problem:
            raise ConfigError(
                f'Failed to open log file "{log.path}" (with index "{index}"). {problem}.'
            )
    if config.pidfile:
        problem = (
            _unsafe_pidfile_directory(config.pidfile)
            or _uncreatable_directory(config.pidfile)
            or _unwritable_file(config.pidfile, replaced=True)
        )
        if problem and pidfile_from:
            raise ConfigError(f"{pidfile_from}: can not be written: {problem}.")
        if problem:
            raise ConfigError(
                f'Configuration file has "pidfile" set to "{config.pidfile}", which can not '
                f"be written: {problem}."
            )


def check_state_dir(path: str) -> None:
    """For ``--test`` and start: the state directory must exist writable, or be creatable.

    Nothing is left behind here (a probe file is made and removed at once);
    the server makes a missing directory at start.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            problem: str | None = "it is not a directory"
        else:
            problem = _cannot_create_in(path, subdirectory=False)
    else:
        problem = _uncreatable_directory(os.path.join(path, "history"))
    if problem:
        raise ConfigError(f'State directory "{path}" can not be written: {problem}.')


def _uncreatable_directory(path: str) -> str | None:
    """Why ``path``'s directory could not be made by this user; None if it exists or could.

    Walks up to the first existing ancestor, which must be a directory this
    user may write and search; nothing is created.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return None
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        return f'"{directory}" is not a directory'
    return _cannot_create_in(directory, subdirectory=True)


def _cannot_create_in(directory: str, *, subdirectory: bool) -> str | None:
    """Why a file (or a directory) cannot be made in ``directory``; None if it can.

    Tried for real (a directory when ``subdirectory``) and removed at once:
    ``os.access`` says yes to root where nothing can be made (``/proc``, a
    read-only mount).
    """
    try:
        if subdirectory:
            os.rmdir(tempfile.mkdtemp(prefix=".fastaphlict-test-", dir=directory))
        else:
            fd, probe = tempfile.mkstemp(prefix=".fastaphlict-test-", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return f'"{directory}" is not writable: {exc.strerror or exc}'
    return None


def unsafe_directory(path: str) -> str | None:
    """Why another local user could swap a file made in directory ``path``; None if none can.

    Every existing directory from ``path`` up to the root, as written and
    as resolved, must belong to root or to this user, and one that every
    user may write must be sticky (``/tmp``): who created ``/var/tmp/aphlict``
    first owns it, and could point the pidfile at any file by a symlink.
    """
    euid = os.geteuid()
    checked: set[str] = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        current = start
        while current not in checked:
            checked.add(current)
            try:
                st = os.lstat(current)
            except OSError:
                st = None
            if st is not None:
                if st.st_uid not in (0, euid):
                    return f'"{current}" belongs to another user (uid {st.st_uid})'
                mode = st.st_mode
                if stat.S_ISDIR(mode) and mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                    return f'"{current}" is writable by every user and not sticky'
            current = os.path.dirname(current)
    return None


def _unsafe_pidfile_directory(pidfile: str) -> str | None:
    problem = unsafe_directory(os.path.dirname(os.path.abspath(pidfile)))
    return f"{problem}: another user could replace it by a symlink" if problem else None


def _unwritable_file(path: str, *, replaced: bool = False) -> str | None:
    """Why ``path`` could not be opened for appending (or created) by this user.

    ``replaced``: the file is written next to it and renamed over it (the
    pidfile), so its directory must be writable even when the file exists.
    """
    if os.path.isdir(path):
        return "Is a directory"
    if os.path.exists(path) and not replaced:
        return None if os.access(path, os.W_OK) else "Permission denied"
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return _cannot_create_in(directory, subdirectory=False)
    return None


def check_listen(config: Config) -> None:
    """For ``--test`` and start: every ``listen`` must resolve, or binding would fail.

    The only network I/O in this module: a name lookup, no socket is bound.
    """
    for index, server in enumerate(config.servers):
        try:
            socket.getaddrinfo(
                server.listen, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            if config.source == "environment":
                where = f'Environment variable LISTEN_ADDR ("{server.listen}")'
            else:
                where = (
                    f'Server (at index "{index}", on port "{server.port}") has "listen" '
                    f'set to "{server.listen}", which'
                )
            raise ConfigError(f"{where} does not resolve to an address: {reason}.") from exc


def check_broker_ca(path: str | None) -> None:
    """The broker's CA file must load."""
    if not path:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f'Broker CA file "{path}" can not be loaded: {exc}.') from exc


def check_tls(config: Config, peer_ca_file: str | None = None) -> None:
    """Every listener's key, certificate and chain, and the peers' CA file, must load.

    Loaded as the server loads them, then dropped: the errors name the entry.
    """
    for index, entry in enumerate(config.servers):
        server_context(entry, index)
    if peer_ca_file:
        client_context(peer_ca_file)


def preflight(settings: Settings) -> None:
    """For ``--test`` and start alike: fail now, on the console, not later at bind time.

    What ``--test`` passes, starts: the same checks run before serving.
    """
    check_files(settings.config, pidfile_from=settings.pidfile_from)
    check_listen(settings.config)
    if settings.state_dir:
        check_state_dir(settings.state_dir)
    check_broker_ca(settings.broker_ca_file)
    check_tls(settings.config, settings.peer_ca_file)
