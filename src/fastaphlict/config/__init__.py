"""Configuration, the face: every name other modules import from ``fastaphlict.config``.

The parts, each one role:

- :mod:`~fastaphlict.config.aphlict`: Aphlict's JSON file and ``CLIENT_PORT``/
  ``ADMIN_PORT``/``LISTEN_ADDR``, validated as Phorge's launcher does;
- :mod:`~fastaphlict.config.limits`: :class:`Limits` and their metadata;
- :mod:`~fastaphlict.config.broker_url`: broker URLs, with redaction;
- :mod:`~fastaphlict.config.tls`: the TLS files loaded into contexts;
- :mod:`~fastaphlict.config.preflight`: the only I/O (TLS files, paths,
  listen addresses), shared by ``--test`` and start;
- :mod:`~fastaphlict.config.options`: every option once (flag, variable, type,
  default, help, docs row), and the parser made from it;
- :mod:`~fastaphlict.config.settings`: :class:`Settings` and :func:`resolve`,
  where flag > environment > file > default is applied;
- :mod:`~fastaphlict.config.errors`: :class:`ConfigError` and :class:`LimitError`.
"""

from __future__ import annotations

from fastaphlict.config.aphlict import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_CLIENT_PORT,
    Config,
    LogConfig,
    PeerConfig,
    ServerConfig,
    from_environment,
    load_config,
    load_file,
    parse_config,
)
from fastaphlict.config.broker_url import (
    SENTINEL_PORT,
    BrokerConfig,
    _parse_sentinel_url,
    address,
    parse_broker_url,
)
from fastaphlict.config.errors import ConfigError, LimitError
from fastaphlict.config.limits import Limits
from fastaphlict.config.preflight import (
    check_broker_ca,
    check_files,
    check_listen,
    check_state_dir,
    check_tls,
    preflight,
    unsafe_directory,
)
from fastaphlict.config.settings import Settings, resolve

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_CLIENT_PORT",
    "SENTINEL_PORT",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "LimitError",
    "Limits",
    "LogConfig",
    "PeerConfig",
    "ServerConfig",
    "Settings",
    "_parse_sentinel_url",
    "address",
    "check_broker_ca",
    "check_files",
    "check_listen",
    "check_state_dir",
    "check_tls",
    "from_environment",
    "load_config",
    "load_file",
    "parse_broker_url",
    "parse_config",
    "preflight",
    "resolve",
    "unsafe_directory",
]
