"""The command connection: publishes and probes, with the scripts loaded and checked.

Made on demand (and again after it closed) to wherever the primary is. On
each new connection the two Lua scripts of this package are loaded
(``publish.lua``, and ``check.lua``, which runs every command the publish
script needs on scratch keys so that a Redis user whose ACL lacks one is
told by name), and the server's ``run_id`` is read: a server other than the
one of before gets the messages the publisher kept (see
:mod:`.publisher`) before anything else.

The scripts are read once, at import, from the package's files; Redis
knows them by their SHA1.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import logging
from typing import Any

import hiredis

from fastaphlict.broker import wire
from fastaphlict.broker.wire import PREFIX
from fastaphlict.resp import RedisError, RespConnection

__all__ = ["CHECK_LUA", "CHECK_SHA", "PUBLISH_LUA", "PUBLISH_SHA", "Commands"]

log = logging.getLogger("fastaphlict.broker")


def _script(name: str) -> tuple[str, str]:
    """A Lua script shipped with the package, and the SHA1 Redis knows it by."""
    text = importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return text, hashlib.sha1(text.encode()).hexdigest()


PUBLISH_LUA, PUBLISH_SHA = _script("publish.lua")
CHECK_LUA, CHECK_SHA = _script("check.lua")
#: Under the marks' prefix, so an ACL narrower than the documented one (one pattern
#: per kind of key) allows them as it allows the marks; never a real mark
#: (fingerprints are hex). The check publishes on the cluster's own channel,
#: where receivers ignore what is neither a message nor a probe.
CHECK_KEYS = tuple(f"{PREFIX}seq:check:{name}" for name in ("stream", "set", "mark"))


class Commands:
    """The command connection, and what the Redis user may not run of what publishing needs."""

    def __init__(self, node: wire.Node, events: wire.Events) -> None:
        self._node = node
        self._events = events
        self._lock = asyncio.Lock()
        #: The connection, while it lasts (None: not made yet).
        self.conn: RespConnection | None = None
        #: What the Redis user may not run of what publishing needs (None: all of it).
        self.refused: str | None = None

    async def get(self) -> RespConnection:
        """The command connection, (re)made on demand with the publish script loaded."""
        async with self._lock:
            conn = self.conn
            if conn is None or conn.is_closed:
                conn = await self._events.connect_primary("commands")
                try:
                    sha, _, check, info = await conn.execute_many(
                        [
                            ("SCRIPT", "LOAD", PUBLISH_LUA),
                            ("SCRIPT", "LOAD", CHECK_LUA),
                            ("EVALSHA", CHECK_SHA, 3, *CHECK_KEYS, self._node.channel),
                            ("INFO", "server"),
                        ],
                        self._node.timeout,
                    )
                    refused = wire.refusals(sha, check)
                    if refused is None and wire.decode_name(sha) != PUBLISH_SHA:
                        raise RedisError(f"SCRIPT LOAD answered {sha!r}, expected {PUBLISH_SHA}")
                    if isinstance(info, hiredis.ReplyError):
                        raise RedisError(f"INFO refused: {info}")
                    run_id = wire.run_id(info)
                except BaseException:
                    conn.close()
                    raise
                # Refused or not, the connection stays: probes need only PUBLISH,
                # and the link and the log say what is missing.
                self._note_refused(refused)
                # No await from here until the connection is in use: what the
                # previous server may have lost goes first.
                self._events.server_changed(run_id)
                self.conn = conn
            return conn

    async def reply(self, command: tuple[Any, ...]) -> Any:
        """One command on the command connection, bounded by ``timeout``."""
        return await (await self.get()).execute(command, self._node.timeout)

    def drop(self) -> None:
        """Close the connection; the next use makes a new one."""
        if self.conn is not None:
            self.conn.close()

    def recheck(self) -> None:
        """If refused: a new connection checks again (it may have been granted meanwhile)."""
        if self.refused is not None:
            self.drop()

    def _note_refused(self, refused: str | None) -> None:
        """Say once, in one line, what the Redis user may not run; and when it may again."""
        if refused == self.refused:
            return
        if refused is not None:
            log.error(
                "broker %s: the Redis user may not run %s: no message can be published"
                " until it may; grant what the ACL line of docs/clusters.md lists",
                self._node.display,
                refused,
            )
        elif self.refused is not None:
            log.info("broker %s: the Redis user may publish now", self._node.display)
            self._events.publishing_allowed()  # what was held goes now
        self.refused = refused
