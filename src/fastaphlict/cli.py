"""Command line: read flags, build the config once, set up logging, start the server.

It takes Aphlict's own flags (``--config=PATH``, ``--test=true``, ``--debug=1``)
so anything that launched the Node server can launch this one unchanged.

Two rules this module keeps:

- It imports ``fastaphlict.server`` (and with it the compiled extension) only
  when it is about to serve, so ``--help`` and ``--test`` work without a build.
- A user's mistake reaches the console as one ``fastaphlict: <message>`` line
  on stderr and exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping, Sequence

from fastaphlict import __version__, state
from fastaphlict.config import (
    BrokerConfig,
    Config,
    ConfigError,
    LimitError,
    Limits,
    check_files,
    check_listen,
    check_state_dir,
    load_config,
    parse_broker_url,
)

__all__ = ["main", "reopen_log_files", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("fastaphlict")

# Handlers this module installed, so a second setup_logging() replaces rather
# than doubles them, and never touches handlers that belong to someone else
# (pytest's capture handler, an embedding application's).
_installed: list[logging.Handler] = []

#: --log-level's choices, most verbose first.
LOG_LEVELS = ("debug", "info", "warning", "error")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

_EPILOG = """\
environment (used only when neither --config nor APHLICT_CONFIG names a file):
  CLIENT_PORT     client (WebSocket) port, default 22280
  ADMIN_PORT      admin (HTTP) port, default 22281
  LISTEN_ADDR     address both servers bind; unset: client 0.0.0.0, admin 127.0.0.1
  APHLICT_CONFIG  path of an Aphlict JSON config file; replaces the variables above

  FASTAPHLICT_<FLAG>  every fastaphlict flag above also reads its variable,
                      e.g. FASTAPHLICT_SHUTDOWN_TIMEOUT for --shutdown-timeout;
                      a flag on the command line wins

signals:
  SIGTERM, SIGINT  drain and exit (a second one exits at once)
  SIGHUP           reopen log files (for logrotate)
"""


def _parse_bool(value: str) -> bool:
    """Aphlict's launcher passes ``--test=true`` and ``--debug=1``; accept both spellings."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false or 1/0, got {value!r}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastaphlict",
        description=(
            "A drop-in, fast replacement for Phorge's Aphlict notification server. "
            "Reads the same JSON config file and speaks the same protocol."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"fastaphlict {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="Aphlict JSON config file (aphlict.custom.json); overrides APHLICT_CONFIG",
    )
    parser.add_argument(
        "--test",
        nargs="?",
        const=True,
        default=False,
        type=_parse_bool,
        metavar="BOOL",
        help="check the config, limits, TLS files, listen addresses, log and pidfile"
        " paths and the state directory (creating nothing), print 'Configuration test OK.'"
        " and exit",
    )
    parser.add_argument(
        "--debug",
        nargs="?",
        const=True,
        default=False,
        type=_parse_bool,
        metavar="BOOL",
        help="log at debug level, including per-connection traces",
    )
    parser.add_argument(
        "--log-level",
        # None, not the variable: main() reads it, to name it in errors.
        default=None,
        type=str.lower,
        choices=LOG_LEVELS,
        help="least severe level logged (default: info; --debug means debug;"
        " env FASTAPHLICT_LOG_LEVEL)",
    )
    limits = parser.add_argument_group(
        "limits and operations (fastaphlict's own; Aphlict's file has no keys for them)"
    )
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        name = field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = _LIMIT_TYPES[type(default)]
        limits.add_argument(
            f"--{name}",
            dest=f"limit_{field.name}",
            type=kind,
            # None, not the variable: _limits() reads it, to name it in errors.
            default=None,
            metavar=_METAVARS[type(default)],
            help=f"{field.metadata['help']} (default: {_show(default)})",
        )
    limits.add_argument(
        "--pidfile",
        # None, not the variable: _pidfile() reads it, to name it in errors.
        default=None,
        metavar="PATH",
        help="write the pid here, not at the config file's pidfile, so processes"
        " sharing one config each have their own (env FASTAPHLICT_PIDFILE)",
    )
    limits.add_argument(
        "--reuse-port",
        nargs="?",
        const=True,
        # None, not the variable: _reuse_port() reads it, to name it in errors.
        default=None,
        type=_parse_bool,
        metavar="BOOL",
        help="bind every client and admin port with SO_REUSEPORT, so several processes"
        " share them and the kernel spreads connections over them (not for sockets"
        " inherited from systemd; env FASTAPHLICT_REUSE_PORT)",
    )
    limits.add_argument(
        "--peer-ca-file",
        default=os.environ.get("FASTAPHLICT_PEER_CA_FILE") or None,
        metavar="PATH",
        help="PEM file of CAs trusted for https cluster peers (default: the system's)",
    )
    limits.add_argument(
        "--broker",
        default=None,
        metavar="URL",
        help="Redis broker shared by every node of a cluster: redis://[user:password@]host:port/db,"
        " rediss://... (TLS, verified), unix:///path, or through Sentinel"
        " redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]"
        " (rediss+sentinel:// with TLS) (default: none; env FASTAPHLICT_BROKER,"
        " which keeps a password off the command line)",
    )
    limits.add_argument(
        "--broker-sentinel-password",
        default=None,
        metavar="PASSWORD",
        help="the sentinels' own password, for a redis+sentinel:// broker whose sentinels"
        " require one (default: none; env FASTAPHLICT_BROKER_SENTINEL_PASSWORD, which keeps"
        " it off the command line)",
    )
    limits.add_argument(
        "--broker-ca-file",
        default=os.environ.get("FASTAPHLICT_BROKER_CA_FILE") or None,
        metavar="PATH",
        help="PEM file of CAs trusted for a rediss:// broker (default: the system's)",
    )
    limits.add_argument(
        "--state-dir",
        default=os.environ.get("FASTAPHLICT_STATE_DIR") or None,
        metavar="PATH",
        help="keep every instance's history here across a graceful restart"
        " (created if missing; default: none, a restart forgets the history)",
    )
    return parser


def _parse_count(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return int(value)


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


_METAVARS = {float: "SECONDS", int: "N", tuple: "A,B,..."}


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


def _parse_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return seconds


_LIMIT_TYPES = {float: _parse_seconds, int: _parse_count, tuple: _parse_list}


def _limits(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Limits:
    """Limits from the flags, then the variables; defaults for the rest.

    Raises ConfigError naming the flag, or the variable when the value came
    from the environment, since that is where the operator has to fix it.
    """
    overrides: dict[str, object] = {}
    sources: dict[str, str] = {}
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        flag = f"--{field.name.replace('_', '-')}"
        value = getattr(args, f"limit_{field.name}")
        if value is not None:
            overrides[field.name] = value
            sources[field.name] = f"{flag}={_show(value)}"
            continue
        variable = f"FASTAPHLICT_{field.name.upper()}"
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        sources[field.name] = f"{variable}={raw} (environment, for {flag})"
        try:
            overrides[field.name] = _LIMIT_TYPES[type(getattr(defaults, field.name))](raw)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{sources[field.name]}: {exc}") from exc
    try:
        return Limits(**overrides)  # type: ignore[arg-type]
    except LimitError as exc:
        raise ConfigError(f"{sources.get(exc.name, exc.name)}: {exc.reason}") from exc


def _pidfile(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, str | None]:
    """``--pidfile``, then ``FASTAPHLICT_PIDFILE``: the path, and how to name it in errors.

    (None, None) leaves the config file's ``pidfile`` in force.
    """
    if args.pidfile:
        return args.pidfile, f"--pidfile={args.pidfile}"
    raw = environ.get("FASTAPHLICT_PIDFILE", "").strip()
    if raw:
        return raw, f"FASTAPHLICT_PIDFILE={raw} (environment, for --pidfile)"
    return None, None


def _reuse_port(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> bool:
    """``--reuse-port``, then ``FASTAPHLICT_REUSE_PORT``; off by default."""
    if args.reuse_port is not None:
        return bool(args.reuse_port)
    raw = environ.get("FASTAPHLICT_REUSE_PORT", "").strip()
    try:
        return _parse_bool(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(
            f"FASTAPHLICT_REUSE_PORT={raw} (environment, for --reuse-port): {exc}"
        ) from exc


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


def log_level(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """The level of the ``fastaphlict`` loggers: ``--debug``, ``--log-level``, then the variable."""
    if args.debug:
        return logging.DEBUG
    name = args.log_level
    if name is None:
        raw = environ.get("FASTAPHLICT_LOG_LEVEL", "").strip()
        name = raw.lower() or "info"
        if name not in LOG_LEVELS:
            raise ConfigError(
                f"FASTAPHLICT_LOG_LEVEL={raw} (environment, for --log-level): "
                f"expected one of {', '.join(LOG_LEVELS)}"
            )
    return logging.getLevelName(name.upper())  # type: ignore[no-any-return]


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


def _check_tls(config: Config, peer_ca_file: str | None) -> None:
    """For ``--test``: load every TLS key and certificate as the server will."""
    from fastaphlict import tls

    for index, entry in enumerate(config.servers):
        tls.server_context(entry, index)
    if peer_ca_file:
        tls.client_context(peer_ca_file)


def broker_config(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> BrokerConfig | None:
    """``--broker`` or ``FASTAPHLICT_BROKER`` parsed; None when neither is set.

    The sentinels' password (``--broker-sentinel-password`` or its variable)
    joins a ``redis+sentinel://`` broker and is refused for any other.

    Errors name where the URL came from and never repeat its password.
    """
    if args.broker is not None:
        raw, where = args.broker, "--broker"
    else:
        raw, where = environ.get("FASTAPHLICT_BROKER", ""), "FASTAPHLICT_BROKER (environment)"
    if not raw.strip():
        if args.broker is not None:
            raise ConfigError("--broker: empty URL")
        return None
    try:
        config = parse_broker_url(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if args.broker_ca_file and not config.tls:
        raise ConfigError(f"--broker-ca-file applies to a rediss:// broker, not {config.display}")
    if args.broker_sentinel_password is not None:
        secret, where = args.broker_sentinel_password, "--broker-sentinel-password"
    else:
        secret = environ.get("FASTAPHLICT_BROKER_SENTINEL_PASSWORD", "")
        where = "FASTAPHLICT_BROKER_SENTINEL_PASSWORD (environment)"
    if secret:
        if not config.sentinel:
            raise ConfigError(
                f"{where} applies to a redis+sentinel:// broker, not {config.display}"
            )
        config = dataclasses.replace(config, sentinel_password=secret)
    return config


def _check_broker_ca(path: str | None) -> None:
    """For ``--test`` and start: the broker's CA file must load."""
    if not path:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f'Broker CA file "{path}" can not be loaded: {exc}.') from exc


def _fail(message: object) -> int:
    print(f"fastaphlict: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status instead of exiting."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits for --help (0) and usage errors (2); report, don't exit,
        # so main() stays callable from tests and embedding code.
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)

    try:
        limits = _limits(args)
        level = log_level(args)
        reuse_port = _reuse_port(args)
        pidfile, pidfile_from = _pidfile(args)
        config = load_config(args.config)
        if pidfile:
            config = dataclasses.replace(config, pidfile=pidfile)
        # The same checks at start as for --test: what --test passes, starts.
        check_files(config, pidfile_from=pidfile_from)
        check_listen(config)
        if args.state_dir:
            check_state_dir(args.state_dir)
            # What start would refuse: another process holding the directory.
            state.check_unlocked(args.state_dir)
        broker = broker_config(args)
        _check_broker_ca(args.broker_ca_file)
        if reuse_port and broker is None:
            raise ConfigError(
                "--reuse-port needs a broker (--broker or FASTAPHLICT_BROKER): Phorge posts"
                " to whichever process the kernel picks, and without a broker the other"
                " processes' tabs would miss the message"
            )
        if args.test:
            _check_tls(config, args.peer_ca_file)
        else:
            setup_logging(config, debug=args.debug, level=level)
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(exc)

    if args.test:
        # Nothing was created: no log file, no directory, no pidfile.
        print("Configuration test OK.")
        return 0

    try:
        server = importlib.import_module("fastaphlict.server")
    except ImportError as exc:
        return _fail(f"cannot load the server (is the package built?): {exc}")

    logger.info("fastaphlict %s starting, config from %s", __version__, config.source)
    try:
        status = server.run(
            config,
            debug=args.debug,
            reuse_port=reuse_port,
            limits=limits,
            peer_ca_file=args.peer_ca_file,
            state_dir=args.state_dir,
            broker=broker,
            broker_ca_file=args.broker_ca_file,
            on_reload=reopen_log_files,
        )
    except KeyboardInterrupt:
        # Ctrl-C before the server has installed its own signal handlers.
        return 130
    except OSError as exc:
        # Typically a port already in use: a fact about the host, not a bug.
        logger.error("cannot serve: %s", exc, exc_info=args.debug)
        return 1
    return int(status or 0)
