"""What the doctor checks: Phorge's ``notification.servers`` read as Phorge reads it.

Pure: no I/O. The input is either the setting's JSON (a bare list, or the
``{"config": [...]}`` object that ``bin/config get notification.servers``
prints) or a client and an admin URL given on the command line. Either way a
:class:`Target` holds the exact URL Phorge uses: for a client the one it
gives browsers (``PhabricatorNotificationServerRef::getWebsocketURI``), for
an admin the one its PHP posts to (``getURI``), both with ``~instance`` and
``?instance=`` when ``cluster.instance`` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["Target", "TargetError", "from_servers", "from_urls"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetError(ValueError):
    """The input does not describe notification servers (the message says why)."""


@dataclass(frozen=True)
class Target:
    """One enabled server of ``notification.servers``: where it is, and the URL Phorge uses."""

    kind: str  # "client" or "admin"
    host: str
    port: int
    secure: bool  # protocol https (wss:// for a client)
    path: str  # the path and query Phorge requests

    @property
    def scheme(self) -> str:
        if self.kind == "client":
            return "wss" if self.secure else "ws"
        return "https" if self.secure else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def http_url(self) -> str:
        """The same URL as a plain HTTP client (curl, Phorge's own check) names it."""
        return ("https" if self.secure else "http") + self.url[len(self.scheme) :]

    @property
    def name(self) -> str:
        """How the report names it: its kind and its URL."""
        return f"{self.kind} {self.url}"

    def at(self, to_path: str) -> str:
        """The admin URL of ``to_path`` (``/status/``), keeping the ``?instance=`` query."""
        base, _, query = self.path.partition("?")
        full = base.rstrip("/") + "/" + to_path.lstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{full}" + (f"?{query}" if query else "")


def phorge_path(path: str | None, instance: str | None, client: bool) -> str:
    """The path and query Phorge builds: ``rtrim(path, '/') + '/' + ~instance/``, ``?instance=``."""
    to_path = f"~{instance}/" if client and instance else ""
    full = (path or "").rstrip("/") + "/" + to_path
    return full + (f"?instance={quote(instance, safe='')}" if instance else "")


def _entries(data: Any) -> list[Any]:
    """The list of server entries: as given, or out of ``bin/config get``'s wrapper."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("config"), list):
        # Phorge's config stack puts the database above local config: the
        # database value wins when both are set.
        values = {
            source.get("source"): source.get("value")
            for source in data["config"]
            if isinstance(source, dict) and source.get("status") == "set"
        }
        for source in ("database", "local"):
            if isinstance(values.get(source), list):
                return values[source]  # type: ignore[no-any-return]
        raise TargetError("notification.servers is not set (bin/config get shows no value)")
    raise TargetError("expected notification.servers: a JSON list of server entries")


def from_servers(data: Any, instance: str | None = None) -> list[Target]:
    """The enabled servers of ``notification.servers``; admins first, as the checks run.

    Entries with ``"disabled": true`` are skipped, as Phorge skips them.
    """
    targets = []
    for index, entry in enumerate(_entries(data)):
        if not isinstance(entry, dict):
            raise TargetError(f"entry {index} is not an object")
        if entry.get("disabled"):
            continue
        kind, host, port, protocol = (entry.get(k) for k in ("type", "host", "port", "protocol"))
        if kind not in ("client", "admin"):
            raise TargetError(f'entry {index}: "type" must be "client" or "admin", not {kind!r}')
        if not isinstance(host, str) or not host:
            raise TargetError(f'entry {index}: "host" must be a host name')
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise TargetError(f'entry {index}: "port" must be a port number, not {port!r}')
        if protocol not in ("http", "https"):
            raise TargetError(f'entry {index}: "protocol" must be "http" or "https"')
        path = entry.get("path") if kind == "client" else None
        if path is not None and not isinstance(path, str):
            raise TargetError(f'entry {index}: "path" must be a string')
        targets.append(
            Target(
                kind, host, port, protocol == "https", phorge_path(path, instance, kind == "client")
            )
        )
    if not targets:
        raise TargetError("no enabled server in notification.servers")
    return sorted(targets, key=lambda t: t.kind != "admin")


def redacted(url: str) -> str:
    """``url`` with any user and password before the host replaced by ``***``.

    By text, not by ``urlsplit``: a URL without ``//`` (``user:pw@host``)
    parses its password as a path, which would still be printed.
    """
    return re.sub(r"^([^/@]*//)?[^/@]*@", r"\1***@", url, count=1)


def from_urls(
    client_url: str | None, admin_url: str | None, instance: str | None = None
) -> list[Target]:
    """Targets from ``--client-url wss://host/ws/`` and ``--admin-url http://127.0.0.1:22281/``.

    Each URL stands for a ``notification.servers`` entry (its scheme, host,
    port and path); ``instance`` is added as Phorge adds it.
    """
    targets = []
    for kind, url, schemes in (
        ("admin", admin_url, {"http": False, "https": True}),
        ("client", client_url, {"ws": False, "wss": True, "http": False, "https": True}),
    ):
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            shown = redacted(url)
            raise TargetError(f"--{kind}-url must be a {'/'.join(schemes)} URL, not {shown!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise TargetError(f"--{kind}-url: {exc}") from exc
        secure = schemes[parts.scheme]
        port = port or _DEFAULT_PORTS["https" if secure else "http"]
        path = parts.path if kind == "client" else None
        targets.append(
            Target(
                kind, parts.hostname, port, secure, phorge_path(path, instance, kind == "client")
            )
        )
    if not targets:
        raise TargetError("give --servers, or --client-url and --admin-url")
    return targets
