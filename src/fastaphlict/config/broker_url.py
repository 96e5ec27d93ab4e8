"""Broker URLs (redis, rediss, unix, Sentinel) parsed, and shown with the password redacted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from fastaphlict.config.errors import ConfigError

__all__ = ["SENTINEL_PORT", "BrokerConfig", "address", "parse_broker_url"]

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
