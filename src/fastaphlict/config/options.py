"""Every option once: its flag, its variable, its type, default, minimum, help and docs row.

:data:`OPTIONS` is the one declaration; the limits among them are made from
the fields of :class:`~fastaphlict.config.limits.Limits`, which declare their
own metadata once. From it come :func:`build_parser` (whose help names each
option's default and variable the same way), the flag table of
``docs/settings.md`` (``tests/settings_table.py``) and the variables
:func:`~fastaphlict.config.settings.resolve` reads.

The parser's defaults are all None (or False for an option no variable sets)
so that ``resolve`` can tell "not given" from a value, and read the variable
from the environment it is handed, never ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastaphlict import __version__
from fastaphlict.config.limits import Limits

__all__ = [
    "LIMITS",
    "LOG_LEVELS",
    "OPTIONS",
    "PATH_VARIABLES",
    "VARIABLES",
    "Option",
    "build_parser",
    "limit_flag",
    "limit_variable",
    "parse_bool",
    "show",
]

#: --log-level's choices, most verbose first.
LOG_LEVELS = ("debug", "info", "warning", "error")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

_DESCRIPTION = (
    "A drop-in, fast replacement for Phorge's Aphlict notification server. "
    "Reads the same JSON config file and speaks the same protocol."
)

#: The title of fastaphlict's own options in ``--help``.
_OWN = "limits and operations (fastaphlict's own; Aphlict's file has no keys for them)"

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

fastaphlict doctor [options]: check the path of browsers and Phorge to the
  servers of notification.servers, step by step (fastaphlict doctor --help)
"""


def parse_bool(value: str) -> bool:
    """Aphlict's launcher passes ``--test=true`` and ``--debug=1``; accept both spellings."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false or 1/0, got {value!r}")


def _parse_count(value: str) -> int:
    # isdigit() also holds for digits int() does not read ("²"): refused the same way.
    try:
        count = int(value) if value.strip().isdigit() else -1
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return count


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _parse_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return seconds


def show(value: object) -> str:
    """A value as an error message repeats it (``--admin-allow=none``)."""
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


def _shown(value: object) -> str:
    """A limit's default as ``--help`` and the docs say it, when its field says nothing."""
    if isinstance(value, tuple):
        return ",".join(value) or "empty"
    if isinstance(value, float):
        return f"{value:g} s"
    return str(value)


@dataclass(frozen=True)
class Option:
    """One option: everything the parser, :func:`resolve` and the docs know of it."""

    flag: str
    #: What it does, as ``--help`` and the docs say it (without default or variable).
    help: str
    #: The variable read when the flag is absent ("" for none).
    variable: str = ""
    #: The converter of a value given (flag or variable); None keeps the text.
    type: Callable[[str], Any] | None = None
    #: The option's value when nothing sets it.
    default: Any = None
    #: The default as ``--help`` and the docs say it ("" for none to say).
    shown: str = ""
    #: The smallest workable value, and what a smaller one would do (limits).
    minimum: float | None = None
    why: str = ""
    #: What happens past the limit (the docs' "past it").
    past: str = ""
    choices: tuple[str, ...] = ()
    #: The value's name in ``--help`` ("" for a flag that takes none).
    metavar: str = ""
    #: Aphlict's spelling of a boolean: the flag alone, or ``=true``/``=1``/``=false``.
    boolean: bool = False
    #: The field of :class:`Limits` it sets ("" for none).
    limit: str = ""
    #: Listed under fastaphlict's own options rather than Aphlict's.
    own: bool = True
    #: ``-h`` for ``--help``.
    short: str = ""

    @property
    def dest(self) -> str:
        if self.limit:
            return f"limit_{self.limit}"
        return self.flag[2:].replace("-", "_")

    @property
    def meaning(self) -> str:
        """What it does, with its choices: the docs' "meaning"."""
        if self.choices:
            return f"{self.help}: {', '.join(self.choices)}"
        return self.help

    @property
    def help_text(self) -> str:
        """``--help``'s line: the meaning, then the default and the variable, always so."""
        asides = [f"default: {self.shown.replace('`', '')}"] if self.shown else []
        if self.variable:
            asides.append(f"env {self.variable}")
        return f"{self.meaning} ({'; '.join(asides)})" if asides else self.meaning

    @property
    def usage(self) -> str:
        """How the docs spell it: ``--flag=METAVAR``, ``--flag[=BOOL]`` or ``--flag``."""
        if not self.metavar:
            return self.flag
        return f"{self.flag}[={self.metavar}]" if self.boolean else f"{self.flag}={self.metavar}"

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        names = [self.short, self.flag] if self.short else [self.flag]
        if self.flag in _PRINT_AND_EXIT:
            parser.add_argument(*names, help=self.help_text, **_PRINT_AND_EXIT[self.flag])
            return
        extra: dict[str, Any] = {"nargs": "?", "const": True} if self.boolean else {}
        if self.choices:
            extra["choices"] = self.choices
        parser.add_argument(
            *names,
            dest=self.dest,
            type=self.type,
            # None when a variable may set it: resolve() reads that, to name it in errors.
            default=None if self.variable else self.default,
            metavar=self.metavar,
            help=self.help_text,
            **extra,
        )


#: The two options that print and exit, with their argparse action.
_PRINT_AND_EXIT: dict[str, dict[str, Any]] = {
    "--help": {"action": "help"},
    "--version": {"action": "version", "version": f"fastaphlict {__version__}"},
}

_LIMIT_TYPES: dict[type, tuple[Callable[[str], Any], str]] = {
    float: (_parse_seconds, "SECONDS"),
    int: (_parse_count, "N"),
    tuple: (_parse_list, "A,B,..."),
}


def limit_flag(name: str) -> str:
    """The flag of the limit ``name`` (a field of Limits)."""
    return f"--{name.replace('_', '-')}"


def limit_variable(name: str) -> str:
    """The variable of the limit ``name``: ``FASTAPHLICT_`` and the field's name."""
    return f"FASTAPHLICT_{name.upper()}"


def _limit_option(spec: dataclasses.Field[Any]) -> Option:
    """The option of one field of :class:`Limits`, from what the field declares."""
    meta = spec.metadata
    parse, metavar = _LIMIT_TYPES[type(spec.default)]
    return Option(
        limit_flag(spec.name),
        meta["help"],
        limit_variable(spec.name),
        type=parse,
        default=spec.default,
        shown=meta["shown"] or _shown(spec.default),
        minimum=meta["minimum"],
        why=meta["why"],
        past=meta["past"],
        metavar=metavar,
        limit=spec.name,
    )


def _aphlict_bool(flag: str, help: str) -> Option:
    """One of Aphlict's own booleans: off unless given, ``--flag``, ``=true`` or ``=1``."""
    return Option(
        flag,
        help,
        type=parse_bool,
        default=False,
        shown="off",
        metavar="BOOL",
        boolean=True,
        own=False,
    )


#: The limits, one option per field of :class:`Limits`.
LIMITS = tuple(_limit_option(spec) for spec in dataclasses.fields(Limits))

#: Every option, in ``--help``'s order.
OPTIONS: tuple[Option, ...] = (
    Option("--help", "show this help message and exit", short="-h", own=False),
    Option("--version", "show program's version number and exit", own=False),
    Option(
        "--config",
        "Aphlict JSON config file (aphlict.custom.json)",
        "APHLICT_CONFIG",
        shown="none: the variables `CLIENT_PORT`, `ADMIN_PORT`, `LISTEN_ADDR`",
        metavar="PATH",
        own=False,
    ),
    _aphlict_bool(
        "--test",
        "check the config, limits, TLS files, listen addresses, log and pidfile paths and"
        " the state directory (creating nothing), print 'Configuration test OK.' and exit",
    ),
    _aphlict_bool(
        "--debug",
        "log at debug level, including per-connection traces, whatever --log-level says",
    ),
    Option(
        "--log-level",
        "least severe level logged",
        "FASTAPHLICT_LOG_LEVEL",
        type=str.lower,
        default="info",
        shown="info",
        choices=LOG_LEVELS,
        metavar="LEVEL",
        own=False,
    ),
    *LIMITS,
    Option(
        "--pidfile",
        "write the pid here, not at the config file's pidfile, so processes sharing one"
        " config each have their own",
        "FASTAPHLICT_PIDFILE",
        shown="the config file's `pidfile`",
        metavar="PATH",
    ),
    Option(
        "--reuse-port",
        "bind every client and admin port with SO_REUSEPORT, so several processes share"
        " them and the kernel spreads connections over them (not for sockets inherited"
        " from systemd)",
        "FASTAPHLICT_REUSE_PORT",
        type=parse_bool,
        default=False,
        shown="off",
        metavar="BOOL",
        boolean=True,
    ),
    Option(
        "--peer-ca-file",
        "PEM file of CAs trusted for https cluster peers",
        "FASTAPHLICT_PEER_CA_FILE",
        shown="the system's CAs",
        metavar="PATH",
    ),
    Option(
        "--broker",
        "Redis broker shared by every node of a cluster: redis://[user:password@]host:port/db,"
        " rediss://... (TLS, verified), unix:///path, or through Sentinel"
        " redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]"
        " (rediss+sentinel:// with TLS); a password belongs in the variable, off the"
        " command line",
        "FASTAPHLICT_BROKER",
        shown="none: one node alone",
        metavar="URL",
    ),
    Option(
        "--broker-sentinel-password",
        "the sentinels' own password, for a redis+sentinel:// broker whose sentinels"
        " require one; it belongs in the variable, off the command line",
        "FASTAPHLICT_BROKER_SENTINEL_PASSWORD",
        shown="none",
        metavar="PASSWORD",
    ),
    Option(
        "--broker-ca-file",
        "PEM file of CAs trusted for a rediss:// broker",
        "FASTAPHLICT_BROKER_CA_FILE",
        shown="the system's CAs",
        metavar="PATH",
    ),
    Option(
        "--state-dir",
        "keep every instance's history here across a graceful restart, in a directory"
        " created if missing",
        "FASTAPHLICT_STATE_DIR",
        shown="none: a restart forgets the history",
        metavar="PATH",
    ),
)

#: Each option's variable, by flag.
VARIABLES = {option.flag: option.variable for option in OPTIONS if option.variable}

#: Path options whose variable applies when the flag is absent (an empty one is unset).
PATH_VARIABLES = {
    option.dest: option.variable
    for option in OPTIONS
    if option.flag in ("--peer-ca-file", "--broker-ca-file", "--state-dir")
}


def build_parser() -> argparse.ArgumentParser:
    """The one parser of the command line: every option of :data:`OPTIONS`, nothing else."""
    parser = argparse.ArgumentParser(
        prog="fastaphlict",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    own = parser.add_argument_group(_OWN)
    for option in OPTIONS:
        option.add_to(own if option.own else parser)
    return parser
