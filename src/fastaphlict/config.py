"""Configuration: one frozen, typed ``Config`` built once at start-up.

This module parses and validates; it does no I/O beyond reading the config
file (and, for ``--test``, checking that the TLS files it names are readable
and that a file can be made where the pidfile, the logs and the state go:
a probe, removed at once). It never binds, never starts anything, and
nothing it makes outlives the check.

Sources, in order of precedence (resolved in :func:`load_config` only):

1. ``--config=PATH``;
2. ``APHLICT_CONFIG`` in the environment (the file replaces every other
   environment setting);
3. ``CLIENT_PORT``, ``ADMIN_PORT`` and ``LISTEN_ADDR``.

The file is Aphlict's own ``aphlict.custom.json``. Validation mirrors Phorge's
launcher (``PhabricatorAphlictManagementWorkflow::parseLaunchArguments``), check
for check and in the same order, so a file ``bin/aphlict`` accepts is accepted
here and the errors read the same. Each message names the index and key at
fault. Deliberate differences: ``pidfile`` may be absent (no pidfile is
written); ``memory.hint`` may be ``null`` (it only sized Node's heap); ports,
of servers and peers, must also lie in 1..65535 rather than fail at bind time.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_CLIENT_PORT",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "LimitError",
    "Limits",
    "LogConfig",
    "PeerConfig",
    "ServerConfig",
    "check_files",
    "check_listen",
    "check_state_dir",
    "from_environment",
    "load_config",
    "load_file",
    "parse_broker_url",
    "parse_config",
    "unsafe_directory",
]

DEFAULT_CLIENT_PORT = 22280
DEFAULT_ADMIN_PORT = 22281

# Node binds every server to all interfaces when "listen" is absent or empty.
DEFAULT_LISTEN = "0.0.0.0"
# Without a file the admin port binds loopback: it is unauthenticated (§7).
DEFAULT_ADMIN_LISTEN = "127.0.0.1"

_TOP_LEVEL_KEYS = ("servers", "logs", "cluster", "pidfile", "memory.hint")
_SERVER_KEYS = ("type", "port", "listen", "ssl.key", "ssl.cert", "ssl.chain")
_LOG_KEYS = ("path",)
_PEER_KEYS = ("host", "port", "protocol")
_SSL_KEYS = ("ssl.key", "ssl.cert", "ssl.chain")


@dataclass(frozen=True)
class ServerConfig:
    """One listener; several of each type may share the process and its hub."""

    type: Literal["client", "admin"]
    port: int
    listen: str
    ssl_key: str | None = None
    ssl_cert: str | None = None
    ssl_chain: str | None = None

    @property
    def tls(self) -> bool:
        """TLS needs both halves; validation guarantees it's both or neither."""
        return bool(self.ssl_key and self.ssl_cert)


@dataclass(frozen=True)
class PeerConfig:
    """A cluster peer's admin port, to which accepted messages are relayed."""

    host: str
    port: int
    protocol: Literal["http", "https"]


@dataclass(frozen=True)
class LogConfig:
    """A log file; the directory is created by the CLI, not here."""

    path: str


@dataclass(frozen=True)
class Config:
    """Everything the server needs, validated; frozen so no module can drift."""

    servers: tuple[ServerConfig, ...]
    logs: tuple[LogConfig, ...] = ()
    cluster: tuple[PeerConfig, ...] = ()
    pidfile: str | None = None
    memory_hint: int | None = None
    source: str = "environment"

    @property
    def client_servers(self) -> tuple[ServerConfig, ...]:
        return tuple(s for s in self.servers if s.type == "client")

    @property
    def admin_servers(self) -> tuple[ServerConfig, ...]:
        return tuple(s for s in self.servers if s.type == "admin")


#: A limit's minimum meaning "any value above zero will do".
_POSITIVE = -1.0


def _limit(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    why: str = "",
    shown: str = "",
    past: str = "",
) -> Any:
    """One limit, declared once: its default, and what ``--help``, the checks and
    the flag table of ``docs/settings.md`` say of it.

    ``minimum`` and ``why`` are the smallest workable value and what a smaller
    one would do; ``shown`` and ``past`` (the default as an operator reads it,
    and what happens past the limit) put it in that table.
    """
    return field(
        default=default,
        metadata={"help": help, "minimum": minimum, "why": why, "shown": shown, "past": past},
    )


@dataclass(frozen=True)
class Limits:
    """Tunables Aphlict's file has no key for: set by CLI flags or FASTAPHLICT_* variables.

    Every limit has a default safe for a public client port; each one that
    refuses something says so with a close code or an HTTP status. Each is
    declared once, here: the CLI builds its flags, variables and ``--help``
    from these fields, and ``tests/settings_table.py`` the table of
    ``docs/settings.md``, which a test checks against them.
    """

    max_frame_size: int = _limit(
        64 * 1024,
        "largest client frame or message in bytes; bigger closes with 1009",
        # Above the 125 bytes of any control frame, so pings and closes still pass.
        minimum=128,
        why="a smaller one closes nearly every client",
        shown="64 KiB",
        past="close 1009 (also for a fragmented message)",
    )
    max_subscriptions: int = _limit(
        4096,
        "PHIDs one socket may listen to; more closes it with 1008",
        minimum=1,
        why="0 closes every socket that subscribes",
        shown="4096 per socket",
        past="close 1008",
    )
    max_phid_length: int = _limit(
        512,
        "longest PHID kept, in bytes; longer ones are skipped",
        minimum=1,
        why="0 skips every PHID",
        shown="512 bytes",
        past="the PHID is skipped",
    )
    max_instance_length: int = _limit(
        128,
        "longest instance name; longer is refused with 400",
        minimum=1,
        why="0 refuses every named instance",
        shown="128 characters",
        past="400 (client upgrade and admin post)",
    )
    max_connections: int = _limit(
        0,
        "open client sockets before upgrades get 503; 0: open-file limit less 256",
        minimum=0,
        why="0 means the open-file limit less 256",
        shown="open-file limit less 256",
        past="upgrade answered 503 with `Retry-After`",
    )
    max_buffered: int = _limit(
        1024 * 1024,
        "unsent bytes a socket may hold before it is closed with 1013",
        minimum=1,
        why="0 closes every socket that is sent anything",
        shown="1 MiB unsent per socket",
        past="close 1013, counted",
    )
    max_body_size: int = _limit(
        2 * 1024 * 1024,
        "largest admin post in bytes; bigger gets 413",
        minimum=1,
        why="0 refuses every post",
        shown="2 MiB",
        past="413",
    )
    # Phorge's feed names the users a story notifies: the object's subscribers,
    # projects expanded to their members. Hundreds at most as a rule, a few
    # thousand for a task a big project follows. 16384 is four times that,
    # and the most one post can then cost is a few ms of loop and ~3 MiB of
    # history; 2 MiB of short PHIDs (260k) held the loop 55-100 ms and +36 MiB.
    max_subscribers: int = _limit(
        16384,
        "entries in one admin post's subscribers list; more gets 413",
        minimum=1,
        why="0 refuses every post that names a subscriber",
        shown="16384 per message",
        past="413 (admin post, a peer's relay included)",
    )
    handshake_timeout: float = _limit(
        5.0,
        "seconds a connection has to finish its WebSocket handshake",
        minimum=_POSITIVE,
        why="no handshake could finish",
        shown="5 s",
        past="connection dropped",
    )
    ping_interval: float = _limit(
        30.0,
        "seconds of silence before a server ping; no answer as long again closes"
        " the socket; 0 turns pings off",
        minimum=0,
        why="0 turns pings off",
        shown="30 s",
        past="silent sockets closed after two intervals",
    )
    relay_timeout: float = _limit(
        5.0, "seconds a relay to a peer may take", minimum=_POSITIVE, why="no relay could finish"
    )
    relay_queue: int = _limit(
        4096,
        "relays queued per peer before the oldest are dropped",
        minimum=1,
        why="0 would drop every relayed message",
    )
    relay_drain_timeout: float = _limit(
        2.0,
        "seconds peer queues get to drain at shutdown",
        minimum=0,
        why="0 abandons queued relays at shutdown",
    )
    shutdown_timeout: float = _limit(
        10.0,
        "longest graceful shutdown before exiting anyway",
        minimum=0,
        why="0 exits without draining",
    )
    broker_timeout: float = _limit(
        2.0,
        "seconds any one Redis call may take before the broker counts as down",
        minimum=_POSITIVE,
        why="no Redis call could finish",
    )
    broker_buffer: int = _limit(
        16384,
        "messages kept for Redis while it is unreachable; past it the oldest are dropped",
        minimum=1,
        why="0 would drop every message of an outage",
        shown="16384 messages",
        past="oldest dropped from the buffer, counted and logged",
    )
    broker_buffer_bytes: int = _limit(
        64 * 1024 * 1024,
        "payload bytes kept for Redis while it is unreachable; past it the oldest are dropped",
        minimum=1,
        why="0 would drop every message of an outage",
        shown="64 MiB",
        past="oldest dropped from the buffer, counted and logged",
    )
    broker_probe_interval: float = _limit(
        1.0,
        "seconds between the probes a node publishes to itself; three missed mean"
        " the subscription is stalled and is reconnected",
        minimum=_POSITIVE,
        why="probes would never stop",
    )
    admin_allow: tuple[str, ...] = _limit(
        (), "networks (CIDR) allowed on the admin port; empty: anyone who reaches it"
    )
    allowed_origins: tuple[str, ...] = _limit(
        (), "Origins allowed on the client port; empty: any, as Aphlict"
    )

    def __post_init__(self) -> None:
        """Refuse values that would start a server that cannot work (``--test`` included)."""
        for spec in fields(self):
            minimum, why = spec.metadata["minimum"], spec.metadata["why"]
            if minimum is None:
                continue
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LimitError(spec.name, value, "must be a finite number")
            if minimum == _POSITIVE and value <= 0:
                raise LimitError(spec.name, value, f"must be more than 0; {why}")
            if value < minimum:
                raise LimitError(spec.name, value, f"must be at least {minimum:g}; {why}")
        self.admin_networks()  # raises LimitError naming a bad entry

    def admin_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``admin_allow`` parsed: the one place the allow-list is read."""
        networks = []
        for net in self.admin_allow:
            try:
                networks.append(ipaddress.ip_network(net.strip(), strict=False))
            except ValueError as exc:
                raise LimitError("admin_allow", net, f"{net!r} is not a network ({exc})") from exc
        return tuple(networks)


#: The port a Sentinel listens on when the URL names none.
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class BrokerConfig:
    """Where the Redis broker is: ``--broker=URL`` parsed.

    The password is kept out of ``repr`` and out of :attr:`display`, which is
    what every log line, error and metric uses. Through Sentinel
    (``redis+sentinel://``), ``host`` and ``port`` are unset: ``sentinels``
    are asked where the primary of ``service`` is, and ``username`` and
    ``password`` are the primary's; the sentinels' own password, if any, is
    ``sentinel_password`` (given apart, never in the URL).
    """

    scheme: Literal["redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"]
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def sentinel(self) -> bool:
        """Whether the primary is found through Sentinel."""
        return self.scheme.endswith("+sentinel")

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")

    @property
    def display(self) -> str:
        """The URL with the password replaced by ``***``: safe for logs and errors."""
        credentials = ""
        if self.username or self.password:
            secret = ":***" if self.password else ""
            credentials = f"{self.username or ''}{secret}@"
        if self.scheme == "unix":
            return f"unix://{credentials}{self.path}?db={self.db}"
        if self.sentinel:
            hosts = ",".join(address(host, port) for host, port in self.sentinels)
            return f"{self.scheme}://{credentials}{hosts}/{self.service}/{self.db}"
        return f"{self.scheme}://{credentials}{address(self.host, self.port)}/{self.db}"

    def primary_at(self, host: str, port: int) -> BrokerConfig:
        """The settings of a connection to the primary a sentinel named."""
        return BrokerConfig(
            "rediss" if self.tls else "redis",
            host=host,
            port=port,
            db=self.db,
            username=self.username,
            password=self.password,
        )

    def sentinel_at(self, host: str, port: int) -> BrokerConfig:
        """The settings of a connection to one sentinel: its own password, no database."""
        return BrokerConfig(
            "rediss" if self.tls else "redis", host=host, port=port, password=self.sentinel_password
        )


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redacted_url(url: str) -> str:
    """``url`` with anything that may be credentials cut out, for an error message."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)" if "@" in url or ":" in url else repr(url)
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1 :]
    return f"{scheme}://{rest}"


def parse_broker_url(url: str) -> BrokerConfig:
    """Parse ``redis://[user:password@]host:port/db``, ``rediss://...``, ``unix:///path``,
    or ``redis+sentinel://...``/``rediss+sentinel://...`` (see :func:`_parse_sentinel_url`).

    Raises ConfigError whose message never holds the password, however
    malformed the URL (it names the URL with its credentials cut out).
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    shown = _redacted_url(url.strip())

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"broker URL {shown}: {reason}")

    # Credentials end at the last '@' (as _redacted_url cuts them). A raw '/',
    # '?' or '#' before it (a base64 password's '/', say) would end the host
    # part early and put the password's tail in the path, query or fragment,
    # which the messages below, or a unix:// socket path, would then show.
    rest = url.strip().partition("://")[2]
    at = rest.rfind("@")
    if at >= 0 and any(c in rest[:at] for c in "/?#"):
        raise fail(
            "percent-encode the user name and password ('/' as %2F, '?' as %3F, '#' as %23,"
            " '@' as %40); in a unix:// socket path, write '@' as %40"
        )
    if url.strip().partition("://")[0].lower() in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(url.strip(), fail)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise fail("the port is not a number in 1..65535") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise fail(
            "expected redis://host:port/db, rediss://host:port/db, unix:///path"
            " or redis+sentinel://host:port,.../service/db"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = parse_qs(parts.query, keep_blank_values=True)
    db_text = query.pop("db", [""])[-1]
    unknown = sorted(query)
    if unknown:
        raise fail(f"unknown parameter(s): {', '.join(unknown)} (only db is read)")
    if scheme == "unix":
        if not parts.path:
            raise fail("unix:// needs the socket's path, as in unix:///run/redis/redis.sock")
        path = unquote(parts.path)
    else:
        path = ""
        if not parts.hostname:
            raise fail("no host")
        if port == 0:
            raise fail("the port is not a number in 1..65535")
        segment = parts.path.strip("/")
        if segment:
            if db_text:
                raise fail("the database is given twice (path and ?db=)")
            db_text = segment
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise fail("the database must be a whole number, as in /0")
    return BrokerConfig(
        scheme=cast('Literal["redis", "rediss", "unix"]', scheme),
        host=parts.hostname or "",
        port=port or 6379,
        path=path,
        db=int(db_text or 0),
        username=username,
        password=password,
    )


def _parse_sentinel_url(url: str, fail: Callable[[str], ConfigError]) -> BrokerConfig:
    """``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``.

    The host list is split here (``urlsplit`` reads one host); the rest
    follows :func:`parse_broker_url`'s rules. The credentials are the
    primary's: the sentinels' password is given apart.
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        raise fail("an IPv6 sentinel address lacks its closing ']'") from None
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for entry in hostlist.split(","):
        entry = entry.strip()
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket:
                raise fail("an IPv6 sentinel address lacks its closing ']'")
        else:
            host, colon, port_text = entry.partition(":")
            rest = f":{port_text}" if colon else ""
        if not host:
            raise fail("a sentinel without a host (write host:port,host:port)")
        port = SENTINEL_PORT
        if rest:
            digits = rest[1:]
            if not (rest.startswith(":") and digits.isascii() and digits.isdigit()):
                raise fail("a sentinel's port is not a number in 1..65535")
            port = int(digits)
            if not 1 <= port <= 65535:
                raise fail("a sentinel's port is not a number in 1..65535")
        sentinels.append((host.lower(), port))
    query = parse_qs(parts.query, keep_blank_values=True)
    db_text = query.pop("db", [""])[-1]
    if query:
        raise fail(f"unknown parameter(s): {', '.join(sorted(query))} (only db is read)")
    segments = (
        [unquote(s) for s in parts.path.strip("/").split("/")] if parts.path.strip("/") else []
    )
    if not segments or not segments[0].strip():
        raise fail("no service: write the name Sentinel monitors, as in .../mymaster/0")
    if len(segments) > 2:
        raise fail("expected /service or /service/db after the sentinels")
    service = segments[0]
    if any(c.isspace() for c in service):
        raise fail("the service name holds a space")
    if service.isdigit():
        raise fail("the first path segment is the service name, not a database: /mymaster/0")
    if len(segments) == 2:
        if db_text:
            raise fail("the database is given twice (path and ?db=)")
        db_text = segments[1]
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise fail("the database must be a whole number, as in /mymaster/0")
    scheme = parts.scheme.lower()
    return BrokerConfig(
        scheme=cast('Literal["redis+sentinel", "rediss+sentinel"]', scheme),
        db=int(db_text or 0),
        username=username,
        password=password,
        sentinels=tuple(sentinels),
        service=service,
    )


class ConfigError(Exception):
    """A configuration problem; the message is user-facing, names index and key."""


class LimitError(ConfigError):
    """A limit out of range; the CLI names the flag or variable it came from."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name} = {value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason


# -- type names, as PhutilTypeSpec prints them, so messages read like Phorge's --


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _is_int(value: object) -> bool:
    # JSON true/false decode to bool, a subclass of int; PHP's is_int() says no.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_optional_string(value: object) -> bool:
    return value is None or isinstance(value, str)


def _check_map(
    value: object,
    keys: tuple[str, ...],
    required: tuple[str, ...],
    what: str,
    lead: str,
) -> dict[str, object]:
    """Mirror ``PhutilTypeSpec::checkMap``: an object, no extra keys, no missing keys."""
    if not isinstance(value, dict):
        raise ConfigError(f"{what} is not a JSON object (got type '{_type_name(value)}').")
    data = cast("dict[str, object]", value)
    extra = [k for k in data if k not in keys]
    if extra:
        raise ConfigError(
            f"{lead} Got unexpected parameters: {', '.join(map(str, extra))}. "
            f"Valid keys are: {', '.join(keys)}."
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{lead} Missing required parameters: {', '.join(missing)}.")
    return data


def _bad_type(lead: str, key: str, expected: str, value: object) -> ConfigError:
    return ConfigError(
        f"{lead} Parameter '{key}' has invalid type. "
        f"Expected type '{expected}', got type '{_type_name(value)}'."
    )


def _lead(what: str) -> str:
    return f"{what} has improper configuration keys."


def _check_port(what: str, key: str, value: object) -> int:
    if not _is_int(value):
        raise _bad_type(_lead(what), key, "int", value)
    port = cast(int, value)
    if not 1 <= port <= 65535:
        raise ConfigError(
            f"{what} has an invalid value for '{key}' (\"{port}\"). "
            "Ports must be between 1 and 65535."
        )
    return port


def _optional_path(value: object) -> str | None:
    # PHP and Node both test these for truthiness: "" means "not set".
    return cast("str | None", value) or None


# -- the file ------------------------------------------------------------------


def parse_config(data: object, source: str) -> Config:
    """Validate an already-decoded JSON value; never raises anything but ConfigError."""
    lead = "Configuration file has improper configuration keys at top level."
    if not isinstance(data, dict):
        raise ConfigError(f"{lead} Expected a JSON object, got type '{_type_name(data)}'.")
    top = _check_map(data, _TOP_LEVEL_KEYS, ("servers",), "Configuration file", lead)

    servers_value = top["servers"]
    if not isinstance(servers_value, list):
        raise _bad_type(lead, "servers", "list<wild>", servers_value)
    for key in ("logs", "cluster"):
        if key in top and not isinstance(top[key], list):
            raise _bad_type(lead, key, "optional list<wild>", top[key])
    pidfile = top.get("pidfile")
    if not _is_optional_string(pidfile):
        raise _bad_type(lead, "pidfile", "string", pidfile)
    memory_hint = top.get("memory.hint")
    if memory_hint is not None and not _is_int(memory_hint):
        raise _bad_type(lead, "memory.hint", "optional int", memory_hint)

    servers = tuple(_parse_servers(cast("list[object]", servers_value)))
    logs = tuple(_parse_logs(cast("list[object]", top.get("logs", []))))
    cluster = tuple(_parse_cluster(cast("list[object]", top.get("cluster", []))))

    return Config(
        servers=servers,
        logs=logs,
        cluster=cluster,
        pidfile=cast("str | None", pidfile) or None,
        memory_hint=cast("int | None", memory_hint),
        source=source,
    )


def _parse_servers(values: list[object]) -> list[ServerConfig]:
    servers: list[ServerConfig] = []
    port_map: dict[int, int] = {}
    for index, value in enumerate(values):
        what = f'Server (at index "{index}")'
        entry = _check_map(value, _SERVER_KEYS, ("type", "port"), what, _lead(what))
        if not isinstance(entry["type"], str):
            raise _bad_type(_lead(what), "type", "string", entry["type"])
        port = _check_port(what, "port", entry["port"])
        for key in ("listen", *_SSL_KEYS):
            if not _is_optional_string(entry.get(key)):
                raise _bad_type(_lead(what), key, "optional string|null", entry.get(key))

        if port in port_map:
            raise ConfigError(
                f'Two servers (at indexes "{port_map[port]}" and "{index}") both bind '
                f'to the same port ("{port}"). Each server must bind to a unique port.'
            )
        port_map[port] = index

        server_type = entry["type"]
        if server_type not in ("admin", "client"):
            raise ConfigError(
                f'A specified server (at index "{index}", on port "{port}") has an '
                f'invalid type ("{server_type}"). Valid types are: admin, client.'
            )

        ssl_key = _optional_path(entry.get("ssl.key"))
        ssl_cert = _optional_path(entry.get("ssl.cert"))
        ssl_chain = _optional_path(entry.get("ssl.chain"))
        if bool(ssl_key) != bool(ssl_cert):
            raise ConfigError(
                f'A specified server (at index "{index}", on port "{port}") specifies '
                'only one of "ssl.key" and "ssl.cert". Each server must specify neither '
                "(to disable SSL) or specify both (to enable it)."
            )
        if ssl_chain and not ssl_key:
            raise ConfigError(
                f'A specified server (at index "{index}", on port "{port}") specifies '
                'a value for "ssl.chain", but no value for "ssl.key" or "ssl.cert". '
                "Servers should only provide an SSL chain if they also provide an SSL "
                "key and SSL certificate."
            )

        servers.append(
            ServerConfig(
                type=cast('Literal["client", "admin"]', server_type),
                port=port,
                listen=cast("str | None", entry.get("listen")) or DEFAULT_LISTEN,
                ssl_key=ssl_key,
                ssl_cert=ssl_cert,
                ssl_chain=ssl_chain,
            )
        )

    if not servers:
        raise ConfigError(
            "Configuration file does not specify any servers. This service will not be "
            "able to interact with the outside world if it does not listen on any ports. "
            'You must specify at least one "admin" server and at least one "client" server.'
        )
    if not any(s.type == "client" for s in servers):
        raise ConfigError(
            "Configuration file does not specify any client servers. This service will "
            "be unable to transmit any notifications without a client server. You must "
            'specify at least one server with type "client".'
        )
    if not any(s.type == "admin" for s in servers):
        raise ConfigError(
            "Configuration file does not specify any administrative servers. This "
            "service will be unable to receive messages. You must specify at least one "
            'server with type "admin".'
        )
    return servers


def _parse_logs(values: list[object]) -> list[LogConfig]:
    logs: list[LogConfig] = []
    for index, value in enumerate(values):
        what = f'Log (at index "{index}")'
        entry = _check_map(value, _LOG_KEYS, _LOG_KEYS, what, _lead(what))
        path = entry["path"]
        if not isinstance(path, str):
            raise _bad_type(_lead(what), "path", "string", path)
        if not path:
            raise ConfigError(f"{what} has an empty value for 'path'.")
        logs.append(LogConfig(path=path))
    return logs


def _parse_cluster(values: list[object]) -> list[PeerConfig]:
    peers: list[PeerConfig] = []
    peer_map: dict[str, int] = {}
    for index, value in enumerate(values):
        what = f'Cluster peer (at index "{index}")'
        entry = _check_map(value, _PEER_KEYS, _PEER_KEYS, what, _lead(what))
        host = entry["host"]
        if not isinstance(host, str):
            raise _bad_type(_lead(what), "host", "string", host)
        port = _check_port(what, "port", entry["port"])
        protocol = entry["protocol"]
        if not isinstance(protocol, str):
            raise _bad_type(_lead(what), "protocol", "string", protocol)

        if protocol not in ("http", "https"):
            raise ConfigError(
                f'Configuration file specifies cluster peer ("{host}", at index '
                f'"{index}") with an invalid protocol, "{protocol}". Valid protocols '
                'are "http" or "https".'
            )

        # Phorge keys peers on host and port only: the same endpoint over both
        # protocols is still one peer, and relaying twice would double-deliver.
        peer_key = f"{host}:{port}"
        if peer_key in peer_map:
            raise ConfigError(
                f'Configuration file specifies cluster peer "{peer_key}" more than once '
                f'(at indexes "{peer_map[peer_key]}" and "{index}"). Each peer must '
                "have a unique host and port combination."
            )
        peer_map[peer_key] = index

        peers.append(
            PeerConfig(
                host=host,
                port=port,
                protocol=cast('Literal["http", "https"]', protocol),
            )
        )
    return peers


def load_file(path: str) -> Config:
    """Read, decode and validate one config file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(
            f'Failed to read configuration file "{path}". {exc.strerror or exc}.'
        ) from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are both ValueErrors.
        raise ConfigError(
            f'Configuration file "{path}" is not properly formatted JSON. {exc}.'
        ) from exc
    return parse_config(data, source=path)


# -- the environment -------------------------------------------------------------


def _env_port(environ: Mapping[str, str], name: str, default: int) -> int:
    # Empty counts as unset: container templates often render "NAME=".
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    # Stricter than int(): no sign, no underscores, no non-ASCII digits.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise ConfigError(
            f'Environment variable {name} ("{raw}") is not a valid port. '
            "Ports must be integers between 1 and 65535."
        )
    return int(raw)


def from_environment(environ: Mapping[str, str]) -> Config:
    """One client and one admin server, from CLIENT_PORT, ADMIN_PORT, LISTEN_ADDR."""
    client_port = _env_port(environ, "CLIENT_PORT", DEFAULT_CLIENT_PORT)
    admin_port = _env_port(environ, "ADMIN_PORT", DEFAULT_ADMIN_PORT)
    if client_port == admin_port:
        raise ConfigError(
            f"Environment variables CLIENT_PORT and ADMIN_PORT both bind to the same "
            f'port ("{client_port}"). Each server must bind to a unique port.'
        )
    listen = environ.get("LISTEN_ADDR", "").strip()
    return Config(
        servers=(
            ServerConfig(type="client", port=client_port, listen=listen or DEFAULT_LISTEN),
            ServerConfig(type="admin", port=admin_port, listen=listen or DEFAULT_ADMIN_LISTEN),
        ),
        source="environment",
    )


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The one place precedence is decided: --config, then APHLICT_CONFIG, then env."""
    if environ is None:
        environ = os.environ
    if path:
        return load_file(path)
    env_path = environ.get("APHLICT_CONFIG", "").strip()
    if env_path:
        return load_file(env_path)
    return from_environment(environ)


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
