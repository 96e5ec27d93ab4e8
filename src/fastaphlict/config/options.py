"""Every option once: its flag, its ``FASTAPHLICT_`` variable, its type, default and help.

:func:`build_parser` is the one parser of the command line; its defaults are
all None (or False for Aphlict's own booleans) so that
:func:`~fastaphlict.config.settings.resolve` can tell "not given" from a value,
and read the variable from the environment it is handed, never ``os.environ``.
The flag table of ``docs/settings.md`` is generated from this parser and the
metadata of :class:`~fastaphlict.config.limits.Limits`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from fastaphlict import __version__
from fastaphlict.config.limits import Limits

__all__ = [
    "LIMIT_TYPES",
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


def parse_bool(value: str) -> bool:
    """Aphlict's launcher passes ``--test=true`` and ``--debug=1``; accept both spellings."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false or 1/0, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
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
        type=parse_bool,
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
        type=parse_bool,
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
        kind = LIMIT_TYPES[type(default)]
        limits.add_argument(
            f"--{name}",
            dest=f"limit_{field.name}",
            type=kind,
            # None, not the variable: _limits() reads it, to name it in errors.
            default=None,
            metavar=_METAVARS[type(default)],
            help=f"{field.metadata['help']} (default: {show(default)})",
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
        type=parse_bool,
        metavar="BOOL",
        help="bind every client and admin port with SO_REUSEPORT, so several processes"
        " share them and the kernel spreads connections over them (not for sockets"
        " inherited from systemd; env FASTAPHLICT_REUSE_PORT)",
    )
    limits.add_argument(
        "--peer-ca-file",
        # None, not the variable: resolve() reads it from the environment it is given.
        default=None,
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
        # None, not the variable: resolve() reads it from the environment it is given.
        default=None,
        metavar="PATH",
        help="PEM file of CAs trusted for a rediss:// broker (default: the system's)",
    )
    limits.add_argument(
        "--state-dir",
        # None, not the variable: resolve() reads it from the environment it is given.
        default=None,
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


def show(value: object) -> str:
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


LIMIT_TYPES = {float: _parse_seconds, int: _parse_count, tuple: _parse_list}


@dataclass(frozen=True)
class Option:
    """One option that is not a limit: its flag, the variable it also reads, its docs default.

    The limits declare the same in :class:`~fastaphlict.config.limits.Limits`
    (their variable is :func:`limit_variable`'s); the parser's help says the rest.
    """

    flag: str
    #: The variable read when the flag is absent ("" for none).
    variable: str = ""
    #: The default as the flag table of ``docs/settings.md`` says it.
    default: str = ""

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


#: Every option but the limits, in ``--help``'s order.
OPTIONS = (
    Option("--help"),
    Option("--version"),
    Option(
        "--config",
        "APHLICT_CONFIG",
        "none: the variables `CLIENT_PORT`, `ADMIN_PORT`, `LISTEN_ADDR`",
    ),
    Option("--test", default="off"),
    Option("--debug", default="off"),
    Option("--log-level", "FASTAPHLICT_LOG_LEVEL", "info"),
    Option("--pidfile", "FASTAPHLICT_PIDFILE", "the config file's `pidfile`"),
    Option("--reuse-port", "FASTAPHLICT_REUSE_PORT", "off"),
    Option("--peer-ca-file", "FASTAPHLICT_PEER_CA_FILE", "the system's CAs"),
    Option("--broker", "FASTAPHLICT_BROKER", "none: one node alone"),
    Option("--broker-sentinel-password", "FASTAPHLICT_BROKER_SENTINEL_PASSWORD", "none"),
    Option("--broker-ca-file", "FASTAPHLICT_BROKER_CA_FILE", "the system's CAs"),
    Option("--state-dir", "FASTAPHLICT_STATE_DIR", "none: a restart forgets the history"),
)

#: Each option's variable, by flag.
VARIABLES = {option.flag: option.variable for option in OPTIONS if option.variable}

#: Path options whose variable applies when the flag is absent (an empty one is unset).
PATH_VARIABLES = {
    option.dest: option.variable
    for option in OPTIONS
    if option.flag in ("--peer-ca-file", "--broker-ca-file", "--state-dir")
}


def limit_flag(name: str) -> str:
    """The flag of the limit ``name`` (a field of Limits)."""
    return f"--{name.replace('_', '-')}"


def limit_variable(name: str) -> str:
    """The variable of the limit ``name``: ``FASTAPHLICT_`` and the field's name."""
    return f"FASTAPHLICT_{name.upper()}"
