"""Settings: every option of one server, resolved once from argv and the environment.

:func:`resolve` is the one place precedence is applied, for every option:
the flag, then its ``FASTAPHLICT_`` variable (read from the ``environ`` it is
given, never from ``os.environ`` behind the caller's back), then Aphlict's
file (or ``CLIENT_PORT``/``ADMIN_PORT``/``LISTEN_ADDR``), then the default.
An error names the flag, or the variable when the value came from the
environment, since that is where the operator has to fix it. Nothing here
touches the file system beyond reading the config file: that is
:mod:`~fastaphlict.config.preflight`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fastaphlict.config.aphlict import Config, load_config
from fastaphlict.config.broker_url import BrokerConfig, parse_broker_url
from fastaphlict.config.errors import ConfigError, LimitError
from fastaphlict.config.limits import Limits
from fastaphlict.config.options import (
    LIMITS,
    LOG_LEVELS,
    PATH_VARIABLES,
    VARIABLES,
    build_parser,
    parse_bool,
    show,
)

__all__ = ["Settings", "resolve"]


@dataclass(frozen=True)
class Settings:
    """Everything one server process is told, validated; frozen so nothing drifts.

    ``pidfile_from`` names the flag or variable that replaced the file's
    ``pidfile`` (None: the file's own), for the errors about it.
    """

    config: Config
    limits: Limits = field(default_factory=Limits)
    debug: bool = False
    log_level: int = logging.INFO
    reuse_port: bool = False
    pidfile_from: str | None = None
    peer_ca_file: str | None = None
    state_dir: str | None = None
    broker: BrokerConfig | None = None
    broker_ca_file: str | None = None
    #: ``--test``: check everything, start nothing.
    test: bool = False


def resolve(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Parse ``argv`` and apply flag > environment > file > default to every option.

    Raises ConfigError naming the source at fault; argparse's own usage
    errors and ``--help`` raise SystemExit, as argparse does.
    """
    args = build_parser().parse_args(argv)
    limits = _limits(args, environ)
    level = _log_level(args, environ)
    reuse_port = _reuse_port(args, environ)
    pidfile, pidfile_from = _pidfile(args, environ)
    config = load_config(args.config, environ)
    if pidfile:
        config = dataclasses.replace(config, pidfile=pidfile)
    paths = {
        name: getattr(args, name) or environ.get(variable, "").strip() or None
        for name, variable in PATH_VARIABLES.items()
    }
    broker = _broker(args, paths["broker_ca_file"], environ)
    if reuse_port and broker is None:
        raise ConfigError(
            "--reuse-port needs a broker (--broker or FASTAPHLICT_BROKER): Phorge posts"
            " to whichever process the kernel picks, and without a broker the other"
            " processes' tabs would miss the message"
        )
    return Settings(
        config=config,
        limits=limits,
        debug=args.debug,
        log_level=level,
        reuse_port=reuse_port,
        pidfile_from=pidfile_from,
        peer_ca_file=paths["peer_ca_file"],
        state_dir=paths["state_dir"],
        broker=broker,
        broker_ca_file=paths["broker_ca_file"],
        test=args.test,
    )


def _limits(args: argparse.Namespace, environ: Mapping[str, str]) -> Limits:
    """Limits from the flags, then the variables; defaults for the rest.

    Raises ConfigError naming the flag, or the variable when the value came
    from the environment, since that is where the operator has to fix it.
    """
    overrides: dict[str, object] = {}
    sources: dict[str, str] = {}
    for option in LIMITS:
        name = option.limit
        value = getattr(args, option.dest)
        if value is not None:
            overrides[name] = value
            sources[name] = f"{option.flag}={show(value)}"
            continue
        raw = environ.get(option.variable, "").strip()
        if not raw:
            continue
        sources[name] = f"{option.variable}={raw} (environment, for {option.flag})"
        assert option.type is not None
        try:
            overrides[name] = option.type(raw)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{sources[name]}: {exc}") from exc
    try:
        return Limits(**overrides)  # type: ignore[arg-type]
    except LimitError as exc:
        raise ConfigError(f"{sources.get(exc.name, exc.name)}: {exc.reason}") from exc


def _pidfile(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``--pidfile``, then ``FASTAPHLICT_PIDFILE``: the path, and how to name it in errors.

    (None, None) leaves the config file's ``pidfile`` in force.
    """
    if args.pidfile:
        return args.pidfile, f"--pidfile={args.pidfile}"
    variable = VARIABLES["--pidfile"]
    raw = environ.get(variable, "").strip()
    if raw:
        return raw, f"{variable}={raw} (environment, for --pidfile)"
    return None, None


def _reuse_port(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """``--reuse-port``, then ``FASTAPHLICT_REUSE_PORT``; off by default."""
    if args.reuse_port is not None:
        return bool(args.reuse_port)
    variable = VARIABLES["--reuse-port"]
    raw = environ.get(variable, "").strip()
    try:
        return parse_bool(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{variable}={raw} (environment, for --reuse-port): {exc}") from exc


def _log_level(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The level of the ``fastaphlict`` loggers: ``--debug``, ``--log-level``, then the variable."""
    if args.debug:
        return logging.DEBUG
    name = args.log_level
    if name is None:
        variable = VARIABLES["--log-level"]
        raw = environ.get(variable, "").strip()
        name = raw.lower() or "info"
        if name not in LOG_LEVELS:
            raise ConfigError(
                f"{variable}={raw} (environment, for --log-level): "
                f"expected one of {', '.join(LOG_LEVELS)}"
            )
    return logging.getLevelName(name.upper())  # type: ignore[no-any-return]


def _broker(
    args: argparse.Namespace, ca_file: str | None, environ: Mapping[str, str]
) -> BrokerConfig | None:
    """``--broker`` or ``FASTAPHLICT_BROKER`` parsed; None when neither is set.

    The sentinels' password (``--broker-sentinel-password`` or its variable)
    joins a ``redis+sentinel://`` broker and is refused for any other.

    Errors name where the URL came from and never repeat its password.
    """
    if args.broker is not None:
        raw, where = args.broker, "--broker"
    else:
        variable = VARIABLES["--broker"]
        raw, where = environ.get(variable, ""), f"{variable} (environment)"
    if not raw.strip():
        if args.broker is not None:
            raise ConfigError("--broker: empty URL")
        return None
    try:
        config = parse_broker_url(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if ca_file and not config.tls:
        # Named as the operator set it: the flag, or the variable it came from.
        origin = "--broker-ca-file"
        if not args.broker_ca_file:
            origin = f"{PATH_VARIABLES['broker_ca_file']} (environment, for --broker-ca-file)"
        raise ConfigError(f"{origin} applies to a rediss:// broker, not {config.display}")
    if args.broker_sentinel_password is not None:
        secret, where = args.broker_sentinel_password, "--broker-sentinel-password"
    else:
        variable = VARIABLES["--broker-sentinel-password"]
        secret = environ.get(variable, "")
        where = f"{variable} (environment)"
    if secret:
        if not config.sentinel:
            raise ConfigError(
                f"{where} applies to a redis+sentinel:// broker, not {config.display}"
            )
        config = dataclasses.replace(config, sentinel_password=secret)
    return config
