"""Finding the broker's primary through Redis Sentinel, and hearing when it moves.

What it owns: asking the sentinels where the primary of the service is
(``SENTINEL get-master-addr-by-name``, each sentinel in turn, the one that
answered last first, so one that is down costs a failed connect and nothing
more), and a subscription to ``+switch-master`` on one sentinel at a time,
which tells the broker at once that a failover has ended. What it never
does: connect to the primary or decide what a new one means. The broker
does that (:mod:`fastaphlict.broker.link`): it checks ``ROLE`` on what it was
told, reconnects everything to the new primary, catches up, and publishes
again what the old one may have lost.

A sentinel's answer can be stale for the seconds a failover takes (it still
names the dead primary); the broker's ``ROLE`` check and its retries cover
that. The sentinels' password is their own (``sentinel_password``), never
the primary's, and no error here names either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastaphlict import resp
from fastaphlict.config import address
from fastaphlict.resp import RedisError

if TYPE_CHECKING:
    from fastaphlict.config import BrokerConfig

__all__ = ["SWITCH_CHANNEL", "Sentinels"]

log = logging.getLogger("fastaphlict.broker")

#: The channel sentinels announce a finished failover on:
#: ``<service> <old host> <old port> <new host> <new port>``.
SWITCH_CHANNEL = "+switch-master"
#: Reconnection delays of the ``+switch-master`` subscription.
WATCH_BACKOFF_FIRST = 0.05
WATCH_BACKOFF_CAP = 2.0


class Sentinels:
    """The sentinels of one service: ask them for the primary, hear of failovers.

    ``on_switch(host, port)`` is called on the event loop when a sentinel
    announces a new primary for the service; :meth:`watch` is the task that
    listens (cancel it to stop).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        timeout: float,
        on_switch: Callable[[str, int], None],
        ca_file: str | None = None,
        name: str = "",
    ) -> None:
        if not config.sentinel or not config.sentinels:
            raise ValueError("not a redis+sentinel:// broker")
        self._config = config
        self._timeout = timeout
        self._on_switch = on_switch
        self._ca_file = ca_file
        self._name = name
        #: Sentinels in the order they are asked: the last to answer first.
        self._order = list(config.sentinels)

    async def primary(self) -> tuple[str, int]:
        """The primary's ``(host, port)`` as the first sentinel that answers names it.

        Raises :class:`RedisError` naming each sentinel's failure when none answers.
        """
        failures = []
        for sentinel in list(self._order):
            try:
                found = await self._ask(*sentinel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.append(f"{address(*sentinel)}: {_reason(exc)}")
                continue
            if self._order[0] != sentinel:
                self._order.remove(sentinel)
                self._order.insert(0, sentinel)
            return found
        raise RedisError(f"no sentinel answered ({'; '.join(failures)})")

    async def _ask(self, host: str, port: int) -> tuple[str, int]:
        conn = await self._connect(host, port)
        try:
            reply = await conn.execute(
                ("SENTINEL", "get-master-addr-by-name", self._config.service), self._timeout
            )
        finally:
            conn.close()
        if reply is None:
            raise RedisError(f"does not monitor a service named {self._config.service!r}")
        primary_host, primary_port = reply
        return primary_host.decode(), int(primary_port)

    async def _connect(self, host: str, port: int) -> resp.RespConnection:
        return await resp.connect(
            self._config.sentinel_at(host, port),
            timeout=self._timeout,
            ca_file=self._ca_file,
            name=self._name,
        )

    async def watch(self) -> None:
        """Listen to ``+switch-master`` on one sentinel at a time, for ever.

        A sentinel that goes away is replaced by the next; when none
        answers, the attempts back off. A switch missed meanwhile is not
        lost: the broker's connections to the old primary fail or get
        ``READONLY``, and asking the sentinels again finds the new one.
        """
        delay = WATCH_BACKOFF_FIRST
        while True:
            for sentinel in list(self._order):
                conn = None
                try:
                    conn = await self._connect(*sentinel)
                    conn.on_push = self._on_push
                    reply = await conn.execute(("SUBSCRIBE", SWITCH_CHANNEL), self._timeout)
                    if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                        raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                    delay = WATCH_BACKOFF_FIRST
                    await conn.closed
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug(
                        "broker: sentinel %s not watched: %s", address(*sentinel), _reason(exc)
                    )
                finally:
                    if conn is not None:
                        conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_CAP)

    def _on_push(self, reply: Any) -> None:
        """A ``+switch-master`` message: tell the broker if it is about our service."""
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return
        words = bytes(reply[2]).decode("utf-8", "replace").split(" ")
        if len(words) != 5 or words[0] != self._config.service:
            return
        try:
            port = int(words[4])
        except ValueError:
            return
        self._on_switch(words[3], port)


def _reason(exc: BaseException) -> str:
    """A failure in words for one log line (never the connection settings)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
