"""Aphlict's own configuration: one frozen, typed ``Config`` built once at start-up.

This module parses and validates; its only I/O is reading the config file
(the checks of the files it names are in :mod:`~fastaphlict.config.preflight`).

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

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from fastaphlict.config.errors import ConfigError

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_CLIENT_PORT",
    "Config",
    "LogConfig",
    "PeerConfig",
    "ServerConfig",
    "from_environment",
    "load_config",
    "load_file",
    "parse_config",
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
