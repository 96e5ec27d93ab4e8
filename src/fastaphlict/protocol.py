"""The protocol's pure rules: what bytes mean, with no I/O and no state.

Everything here is a function of its arguments, tested from tables of bytes
(``tests/test_protocol.py``); the I/O modules call it and never re-decide it:

* JSON as JavaScript reads and writes it (:func:`loads`, :func:`dumps`), with
  one nesting limit both ports share (:data:`MAX_DEPTH`);
* the client commands (:func:`read_command`, :func:`parse_command`) and the
  instance named by a WebSocket path (:func:`instance_from_path`);
* the replay window of a ``replay`` command (:func:`replay_age`);
* the head of the one admin request the fast path serves, Phorge's plain
  ``POST /``, by RFC 9112's strict rules (:func:`parse_post_head`,
  :func:`could_be_plain_head`, :func:`query_instance`).

Spec: ``aphlict-protocol.md`` §1 (admin), §2 (client), §4 (history).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson

__all__ = [
    "BENIGN",
    "COMMANDS",
    "DEFAULT_INSTANCE",
    "HISTORY_LIMIT",
    "HISTORY_TTL_MS",
    "MAX_DEPTH",
    "MAX_PLAIN_FIELDS",
    "MAX_PLAIN_HEAD",
    "PING_COMMAND",
    "PONG",
    "NestingTooDeep",
    "could_be_plain_head",
    "dumps",
    "instance_from_path",
    "loads",
    "parse_command",
    "parse_post_head",
    "query_instance",
    "read_command",
    "replay_age",
]

DEFAULT_INSTANCE = "default"
#: History per instance: at most this many messages, none older than the TTL.
HISTORY_LIMIT = 4096
HISTORY_TTL_MS = 60_000
#: The four commands a browser sends.
COMMANDS = frozenset({"subscribe", "unsubscribe", "replay", "ping"})
#: The reply to ``ping``, byte for byte.
PONG = b'{"type":"pong"}'
#: JX.Aphlict's ping, byte for byte: it may be answered without decoding it.
PING_COMMAND = b'{"command":"ping","data":null}'


# -- JSON as JavaScript reads and writes it ----------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_or_null(text: str) -> float | None:
    # JSON.parse reads 1e400 as Infinity and JSON.stringify writes it as null;
    # keeping inf would let a frame carry "Infinity", which no browser parses.
    value = float(text)
    return value if math.isfinite(value) else None


#: Deepest nesting of arrays and objects a message may have (``[]`` is 1 deep).
#: orjson writes at most this deep (it reads up to 1024), so every value that
#: :func:`loads` returns goes out on orjson's fast path, and the admin and
#: client ports refuse exactly the same inputs. A Phorge message is 2 deep.
MAX_DEPTH = 254


class NestingTooDeep(ValueError):
    """JSON nested deeper than :data:`MAX_DEPTH`: refused like invalid JSON."""

    def __init__(self) -> None:
        super().__init__(f"JSON nested deeper than {MAX_DEPTH}")


#: A body this short can't hold more than MAX_DEPTH levels: each costs 2 bytes.
_SHALLOW_BODY = 2 * MAX_DEPTH + 1


def _deeper_than(value: Any, limit: int, source: bytes | str | None = None) -> bool:
    """Whether ``value`` nests lists and dicts more than ``limit`` deep.

    Each container of ``value`` came from one ``[`` or ``{`` of ``source``:
    when the text holds at most ``limit`` of them, the answer is no without
    touching the value. Finding them is memchr, a few hundred ns for a post
    of any size, far less than counting bytes or walking the value, so the
    walk is left to unusual bodies. The walk is iterative (no depth can
    overflow the stack) and stops at the first container past the limit.
    """
    if not isinstance(value, (list, dict)):
        return False
    if source is not None:
        found = 0
        for opener in ("[", "{") if isinstance(source, str) else (b"[", b"{"):
            at = source.find(opener)  # type: ignore[arg-type]
            while at >= 0 and found <= limit:
                found += 1
                at = source.find(opener, at + 1)  # type: ignore[arg-type]
        if found <= limit:
            return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def loads(body: bytes | str) -> Any:
    """Decode JSON as JavaScript's ``JSON.parse`` would, up to :data:`MAX_DEPTH` deep.

    orjson is the fast path. It refuses lone UTF-16 surrogates in ``\\u``
    escapes and numbers beyond a double, which JavaScript accepts, so those
    fall back to the standard library (told to refuse ``NaN`` and
    ``Infinity``, and to read an overflowing number as null, as a browser
    would after its own round trip).
    Raises ``ValueError`` on invalid JSON and :class:`NestingTooDeep` (a
    ``ValueError``) past :data:`MAX_DEPTH`; never ``RecursionError``.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_or_null)
        except RecursionError:
            raise NestingTooDeep() from None
    if len(body) > _SHALLOW_BODY and _deeper_than(value, MAX_DEPTH, body):
        raise NestingTooDeep()
    return value


def dumps(value: Any) -> bytes:
    """Encode compactly as UTF-8, key order kept, without ``\\u`` escapes.

    A lone surrogate (see :func:`loads`) can't be UTF-8: it goes out as its
    ``\\uXXXX`` escape, as ``JSON.stringify`` writes it, so the frame stays
    valid UTF-8 and no browser drops the connection over it. A value nested
    past :data:`MAX_DEPTH` raises :class:`NestingTooDeep`, whichever encoder
    would have taken it: what :func:`loads` refuses, this never writes.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a surrogate, a huge int, or depth
        if _deeper_than(value, MAX_DEPTH):
            raise NestingTooDeep() from None
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


def replay_age(data: Any) -> float | None:
    """The replay window in ms for a ``replay`` command's ``data``, or None to ignore it.

    Aphlict's rule: a missing, zero or non-numeric age means the default
    (60 s); a negative age means nothing; the window never exceeds the
    history's retention. ``data`` itself must be an object, or null/missing.
    """
    if data is None:
        return float(HISTORY_TTL_MS)
    if not isinstance(data, dict):
        return None
    age = data.get("age")
    if isinstance(age, bool) or not isinstance(age, (int, float)) or age == 0:
        return float(HISTORY_TTL_MS)
    if isinstance(age, float) and math.isnan(age):  # a huge int is no float
        return float(HISTORY_TTL_MS)
    if age < 0:
        return -1.0
    return float(min(age, HISTORY_TTL_MS))


# -- client commands and paths ------------------------------------------------------


def instance_from_path(path: bytes | str) -> str:
    """The instance named by a raw request path, Aphlict's way.

    No ``~`` means ``default``; otherwise the text between the first ``~`` and
    the next ``~`` (or the end), with every ``/`` deleted; empty means
    ``default``. The query string is ignored and nothing is URL-decoded:
    ``/~acme/?instance=acme`` is ``acme``, ``/~a/b/`` is ``ab``.
    """
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    path = path.split("?", 1)[0]
    start = path.find("~")
    if start < 0:
        return DEFAULT_INSTANCE
    rest = path[start + 1 :]
    end = rest.find("~")
    if end >= 0:
        rest = rest[:end]
    name = rest.replace("/", "")
    return name or DEFAULT_INSTANCE


def parse_command(payload: bytes | str) -> tuple[str, Any] | None:
    """Decode one client message into ``(command, data)``, or None to ignore it.

    Aphlict never answers a bad frame with an error: non-JSON, non-objects,
    unknown commands and wrongly typed ``data`` are all ignored. ``data`` is
    checked here so the caller can trust its type: a list for
    (un)subscribe, an object or None for replay, anything for ping.
    """
    parsed = read_command(payload)
    return None if isinstance(parsed, str) else parsed


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_command(payload: bytes | str) -> tuple[str, Any] | str:
    """``(command, data)``, or why the frame is ignored (:data:`BENIGN` for the routine case)."""
    try:
        msg = loads(payload)
    except NestingTooDeep:
        return "nested too deep"  # the admin port refuses the same JSON
    except UnicodeDecodeError:
        return "not UTF-8"
    except ValueError:
        if isinstance(payload, bytes) and not _is_utf8(payload):
            return "not UTF-8"  # orjson and json both say "not JSON" for it
        return "not JSON"
    if not isinstance(msg, dict):
        return "not a JSON object"
    command = msg.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        return "unknown command"
    data = msg.get("data")
    if command in ("subscribe", "unsubscribe"):
        if not isinstance(data, list):
            # Browsers really send {"command":"subscribe","data":null}: routine.
            return BENIGN
    elif command == "replay" and data is not None and not isinstance(data, dict):
        return "replay data is not an object"
    return command, data


#: Why a ``(un)subscribe`` with non-list data is ignored: browsers send
#: ``{"command":"subscribe","data":null}``, so it is routine, not a fault.
BENIGN = "data is not a list"


# -- the admin fast path's request head ---------------------------------------------


def query_instance(target: bytes) -> str:
    """The first ``instance`` query value, decoded as aiohttp/yarl would."""
    _, _, query = target.partition(b"?")
    if not query:
        return ""  # Phorge's own posts (``POST /``, no cluster.instance): no parse_qsl
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8"):
        if key == "instance":
            return value
    return ""


#: aiohttp refuses a line over 8190 bytes and a head of more than 128 fields;
#: the fast path leaves anything near those limits to it.
MAX_PLAIN_HEAD = 8190
MAX_PLAIN_FIELDS = 100
#: What the fast path serves: ``POST /`` (with a query or not), HTTP/1.0 or 1.1,
#: and field lines as RFC 9112 §5 writes them: a token, a colon right after it,
#: a value of visible ASCII, spaces and tabs. That excludes whitespace before
#: the colon, obs-fold, bare CR or LF, NUL and other controls anywhere, and
#: bytes past ASCII. The query is RFC 3986's: unreserved, sub-delims, ``:@/?``
#: and well-formed %-escapes.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUERY_CHARS = rb"[-A-Za-z0-9._~!$&'()*+,;=:@/?]*"
_QUERY = _QUERY_CHARS + rb"(?:%[0-9A-Fa-f]{2}" + _QUERY_CHARS + rb")*"
_FIELD_LINES = b"(?:%b){0,%d}" % (rb"\r\n" + _TOKEN + rb":[\t\x20-\x7e]*", MAX_PLAIN_FIELDS)
_PLAIN_HEAD = re.compile(rb"POST (/(?:\?" + _QUERY + rb")?) HTTP/1\.([01])" + _FIELD_LINES)
#: The fields the fast path reads or leaves to aiohttp. Matched on a head that
#: :data:`_PLAIN_HEAD` passed, so every match is a whole field line.
_READ_FIELDS = re.compile(
    rb"\r\n(content-(?:length|encoding|type|location|range)|transfer-encoding|connection"
    rb"|upgrade|expect|host|user-agent|etag|max-forwards|server|sec-websocket-key1):"
    rb"[ \t]*([^\r]*)",
    re.IGNORECASE,
)
#: Fields a request may hold once (RFC 9110 singletons aiohttp checks) that
#: Phorge and curl send; the other singletons have no business here.
_ONCE = frozenset({b"host", b"content-type", b"user-agent"})
#: Digits of a Content-Length the fast path reads (a petabyte): a longer one,
#: which aiohttp may call an overflow, is aiohttp's to answer.
_LENGTH_DIGITS = 15


#: A byte no plain head holds, a CR without its LF, or an LF without its CR.
_NOT_PLAIN = re.compile(rb"[^\t\r\n\x20-\x7e]|\r[^\n]|(?<!\r)\n")


def could_be_plain_head(start: bytes | bytearray) -> bool:
    """Whether ``start``, a head still incomplete, may yet be one :func:`parse_post_head` takes.

    The fast path hands anything else to aiohttp at once, so a head that
    ends in bare LFs, say, is answered now, as aiohttp answers it, rather
    than waiting for a CRLF CRLF that never comes.
    """
    return (
        len(start) <= MAX_PLAIN_HEAD + 4
        and b"POST /".startswith(start[:6])
        and _NOT_PLAIN.search(start) is None
    )


def parse_post_head(head: bytes) -> tuple[bytes, int, bool, bool] | None:
    """``(target, content length, expects 100-continue, close after)``, or None.

    ``head`` runs from the request line to the last field line, without the
    blank line. None means "not the plain post this path serves": aiohttp
    takes over, and answers as it would without the fast path. Only what
    this function fully understands passes, so the fast path never reads a
    head differently from aiohttp (or a proxy in front), which is how request
    smuggling starts: RFC 9112 syntax only (see :data:`_PLAIN_HEAD`), exactly
    one ``Content-Length`` of digits, one ``Host`` (none is fine in
    HTTP/1.0: RFC 9112 §3.2), at most one ``Content-Type`` and
    ``User-Agent``, and no ``Transfer-Encoding``, ``Content-Encoding``
    (aiohttp would decompress the body), ``Upgrade`` or other singleton
    field that aiohttp refuses twice.

    ``Connection`` is a token list: ``close`` closes, ``keep-alive`` keeps an
    HTTP/1.0 connection open. ``Expect: 100-continue`` counts in HTTP/1.1
    only (RFC 9110 §10.1.1); another expectation is aiohttp's (417).
    """
    plain = _PLAIN_HEAD.fullmatch(head) if len(head) <= MAX_PLAIN_HEAD else None
    if plain is None:
        return None
    target, minor = plain.groups()
    http11 = minor == b"1"
    length = -1
    expect_continue = False
    connection: set[bytes] = set()
    seen: set[bytes] = set()
    for name, value in _READ_FIELDS.findall(head):
        name = name.lower()
        if name == b"content-length":
            value = value.rstrip(b" \t")
            if length >= 0 or not value.isdigit() or len(value) > _LENGTH_DIGITS:
                return None
            length = int(value)
        elif name in _ONCE:
            if name in seen:
                return None
            seen.add(name)
        elif name == b"connection":
            connection.update(token.strip(b" \t") for token in value.lower().split(b","))
        elif name == b"expect":
            if not http11:
                continue
            if value.rstrip(b" \t").lower() != b"100-continue":
                return None
            expect_continue = True
        else:  # transfer-encoding, content-encoding, upgrade, other singletons
            return None
    if length < 0 or (http11 and b"host" not in seen) or b"upgrade" in connection:
        return None
    close = b"close" in connection or not (http11 or b"keep-alive" in connection)
    return target, length, expect_continue, close
