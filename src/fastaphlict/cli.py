"""Command line: argv -> Settings -> preflight -> logging -> the server.

It takes Aphlict's own flags (``--config=PATH``, ``--test=true``, ``--debug=1``)
so anything that launched the Node server can launch this one unchanged.

Two rules this module keeps:

- It imports ``fastaphlict.server`` (and with it the compiled extension) only
  when it is about to serve, so ``--help`` and ``--test`` work without a build.
- A user's mistake reaches the console as one ``fastaphlict: <message>`` line
  on stderr and exit status 1, never as a traceback.
"""

from __future__ import annotations

import importlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping, Sequence

from fastaphlict import __version__, state
from fastaphlict.config import Config, ConfigError, preflight, resolve

__all__ = ["entry", "main", "reopen_log_files", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("fastaphlict")

# Handlers this module installed, so a second setup_logging() replaces rather
# than doubles them, and never touches handlers that belong to someone else
# (pytest's capture handler, an embedding application's).
_installed: list[logging.Handler] = []


def reopen_log_files() -> None:
    """Close every log file this module opened; each reopens on its next record.

    Called on SIGHUP: after logrotate moved the file, logging resumes in a
    fresh one at the configured path.
    """
    for handler in _installed:
        if isinstance(handler, logging.FileHandler):
            with handler.lock:  # type: ignore[union-attr]
                handler.close()


def _remove_installed_handlers() -> None:
    root = logging.getLogger()
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()


def setup_logging(config: Config, debug: bool, level: int | None = None) -> None:
    """Send logs to stderr and to every ``logs[].path``; safe to call again.

    Handlers go on the Python root logger, not only on ``fastaphlict``, so that
    warnings and errors from picows, aiohttp and asyncio (an unretrieved task
    exception, say) land in the same log file with the same format. Only the
    ``fastaphlict`` logger is raised to INFO; everything else keeps the root's
    level (WARNING by default). ``level`` (``--log-level``) overrides ``debug``'s choice
    of DEBUG or INFO for ``fastaphlict``.

    Raises ConfigError, naming the log's index, when a log directory can't be
    created or a log file can't be opened: Node fails its ``--test`` the same way.
    """
    _remove_installed_handlers()
    formatter = logging.Formatter(LOG_FORMAT)

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:
        for index, log in enumerate(config.logs):
            directory = os.path.dirname(log.path)
            try:
                if directory:
                    os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f'Failed to create directory "{directory}" for specified log file '
                    f'(with index "{index}"). You should manually create this directory '
                    f"or choose a different logfile location. {exc.strerror or exc}."
                ) from exc
            try:
                # Watched: logrotate moves the file away and we reopen the path,
                # instead of writing on into the rotated copy forever.
                handlers.append(logging.handlers.WatchedFileHandler(log.path, encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(
                    f'Failed to open log file "{log.path}" (with index "{index}"). '
                    f"{exc.strerror or exc}."
                ) from exc
    except ConfigError:
        for handler in handlers:
            handler.close()
        raise

    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
        _installed.append(handler)

    if level is None:
        level = logging.DEBUG if debug else logging.INFO
    logger.setLevel(level)
    # picows logs every accepted connection at INFO: noise at Phorge's scale.
    logging.getLogger("picows").setLevel(logging.DEBUG if debug else max(level, logging.WARNING))


def _fail(message: object) -> int:
    print(f"fastaphlict: {message}", file=sys.stderr)
    return 1


def entry() -> None:
    """The process's entry point (``fastaphlict``, ``python -m fastaphlict``).

    :func:`main`, except that a server that stopped cleanly ends the process
    at once (see ``fastaphlict.server.exit_now``): a restart waits for it.
    """
    sys.exit(main(exit_when_stopped=True))


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    exit_when_stopped: bool = False,
) -> int:
    """Run the command line; returns the process exit status instead of exiting.

    ``environ`` (default ``os.environ``) is the only environment read;
    ``exit_when_stopped`` is the process entry's (:func:`entry`).
    ``fastaphlict doctor ...`` runs the doctor instead (Phorge's launcher
    never passes a positional word, so no server command line starts so).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["doctor"]:
        from fastaphlict import doctor  # not the server: no compiled module needed

        return doctor.main(args[1:])
    try:
        settings = resolve(args, os.environ if environ is None else environ)
    except SystemExit as exc:
        # argparse exits for --help (0) and usage errors (2); report, don't exit,
        # so main() stays callable from tests and embedding code.
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(exc)

    try:
        preflight(settings)
        if settings.state_dir:
            # What start would refuse: another process holding the directory.
            state.check_unlocked(settings.state_dir)
        if not settings.test:
            setup_logging(settings.config, debug=settings.debug, level=settings.log_level)
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(exc)

    if settings.test:
        # Nothing was created: no log file, no directory, no pidfile.
        print("Configuration test OK.")
        return 0

    try:
        server = importlib.import_module("fastaphlict.server")
    except ImportError as exc:
        return _fail(f"cannot load the server (is the package built?): {exc}")

    logger.info("fastaphlict %s starting, config from %s", __version__, settings.config.source)
    try:
        status = server.run(
            settings, on_reload=reopen_log_files, exit_when_stopped=exit_when_stopped
        )
    except KeyboardInterrupt:
        # Ctrl-C before the server has installed its own signal handlers.
        return 130
    except OSError as exc:
        # Typically a port already in use: a fact about the host, not a bug.
        logger.error("cannot serve: %s", exc, exc_info=settings.debug)
        return 1
    return int(status or 0)
