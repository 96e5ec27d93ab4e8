"""Cluster peers: this process's fingerprint and the relay of messages to peers.

The hub calls :meth:`PeerRelay.relay` on the publish path, while Phorge waits
for its receipt (and gives up after 2 s). So relaying must never block, await
or raise into the caller: ``relay()`` only appends to a bounded per-peer queue,
and one worker task per peer does the HTTP. A peer that is down or hangs costs
its own worker some time and nothing else.

Wire contract: ``aphlict-protocol.md`` §5 (touched, fingerprint receipts,
byte-exact ``Content-Length``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import yarl

from fastaphlict.protocol import dumps
from fastaphlict.stats import RELAY_LATENCY_BUCKETS, Latency

if TYPE_CHECKING:
    from fastaphlict.config import PeerConfig

__all__ = ["FINGERPRINT_ALPHABET", "Peer", "PeerRelay", "new_fingerprint"]

logger = logging.getLogger("fastaphlict.peers")

FINGERPRINT_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
FINGERPRINT_LENGTH = 16
#: Seconds a peer gets at shutdown to have a connection before its queue is
#: abandoned: a reachable peer connects in a millisecond, and SIGTERM should
#: exit within 200 ms whatever the peers do.
CONNECT_GRACE = 0.1

_HEADERS = {"Content-Type": "application/json"}

#: Upper bounds (seconds) of the relay latency histogram (kept under this name).
LATENCY_BUCKETS = RELAY_LATENCY_BUCKETS


def new_fingerprint() -> str:
    """Return a fresh process fingerprint, drawn from a cryptographic source.

    Peers use it to recognise a message that has already passed through us, so
    two processes must not plausibly collide.
    """
    return "".join(secrets.choice(FINGERPRINT_ALPHABET) for _ in range(FINGERPRINT_LENGTH))


def _base_url(config: PeerConfig) -> str:
    host = config.host
    # A bare IPv6 literal needs brackets, or its colons read as the port.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{config.protocol}://{host}:{config.port}/"


async def _connected(
    session: aiohttp.ClientSession,
    context: types.SimpleNamespace,
    params: object,
) -> None:
    """Trace hook: the request to this peer has its connection now."""
    peer = context.trace_request_ctx
    if isinstance(peer, Peer):
        peer._connecting = False


class _DaemonLookups:
    """The part of a loop ``aiohttp.ThreadedResolver`` uses, looking names up in daemon threads.

    The loop's own lookups run in a thread pool that is joined at exit: a
    peer whose DNS server doesn't answer would hold a stopping process for
    the resolver's whole timeout. A daemon thread is simply left behind.
    Lookups are rare (aiohttp caches them), so a thread each is cheap.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        future: asyncio.Future[Any] = self._loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def lookup() -> None:
            try:
                result, error = socket.getaddrinfo(*args, **kwargs), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=lookup, name="fastaphlict-dns", daemon=True).start()
        return await future

    def getnameinfo(self, *args: Any) -> Any:
        return self._loop.getnameinfo(*args)


class Peer:
    """State of one configured peer: its queue, learned fingerprint and counters.

    Counters are plain ints read by tests and metrics; only this module writes
    them, always from the event loop thread.
    """

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.url = _base_url(config)
        self.fingerprint: str | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.last_error: str | None = None
        #: Relay round-trip seconds.
        self.latency = Latency(LATENCY_BUCKETS)
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._failing = False
        self._failure_streak = 0
        self._dropping = False
        self._dropped_at_start = 0
        #: A request is under way and has no connection yet (name lookup or
        #: TCP connect): shutdown doesn't wait for such a peer.
        self._connecting = False

    @property
    def queued(self) -> int:
        """Messages waiting for this peer, not counting one in flight."""
        return len(self._queue)

    @property
    def failing(self) -> bool:
        """Whether the last relay to this peer failed (until one succeeds)."""
        return self._failing

    def __repr__(self) -> str:
        return (
            f"<Peer {self.url} fingerprint={self.fingerprint!r} sent={self.sent}"
            f" failed={self.failed} dropped={self.dropped} queued={self.queued}>"
        )


class PeerRelay:
    """Relays published messages to every configured peer, each in order.

    Lifecycle: construct anywhere, ``await start()`` inside the running loop,
    ``relay()`` from the publish path, ``await close()`` on shutdown. Messages
    relayed before ``start()`` wait in the queue; after ``close()`` begins they
    are ignored.
    """

    def __init__(
        self,
        peers: Sequence[PeerConfig],
        *,
        timeout: float = 5.0,
        queue_limit: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit!r}")
        self._peers = tuple(Peer(config) for config in peers)
        self._timeout = timeout
        self._queue_limit = queue_limit
        # Leave the queue-full state only once half the queue has drained, so
        # a peer hovering at the limit doesn't log dropping/recovered per message.
        self._recover_at = queue_limit // 2
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._close_task: asyncio.Future[None] | None = None
        self._cluster: Callable[[], Iterable[str]] | None = None

    @property
    def peers(self) -> tuple[Peer, ...]:
        return self._peers

    def join_cluster(self, members: Callable[[], Iterable[str]]) -> None:
        """List this node's broker cluster in ``touched`` of every relayed copy.

        A mesh peer then relays the message to none of the cluster's nodes
        (they have it from the broker already), and a cluster node it reaches
        anyway drops it as a loopback.
        """
        self._cluster = members

    async def start(self) -> None:
        """Create the HTTP session and one worker per peer. Calling it again does nothing."""
        if self._session is not None or self._closing:
            return
        connector = aiohttp.TCPConnector(
            # Each worker has at most one request in flight; the spare slot
            # covers a connection still being torn down after a timeout.
            limit=0,
            limit_per_host=2,
            ssl=self._ssl_context if self._ssl_context is not None else True,
            resolver=aiohttp.ThreadedResolver(_DaemonLookups(asyncio.get_running_loop())),  # type: ignore[arg-type]
        )
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(_connected)
        trace.on_connection_reuseconn.append(_connected)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[trace],
        )
        for peer in self._peers:
            task = asyncio.create_task(self._run(peer), name=f"fastaphlict-peer {peer.url}")
            self._workers.append(task)
        if self._peers:
            logger.info(
                "relaying to %d peer(s): %s",
                len(self._peers),
                ", ".join(p.url for p in self._peers),
            )

    def relay(self, instance: str, message: Mapping[str, Any], body: bytes) -> None:
        """Queue the message for every peer whose fingerprint isn't in ``touched``.

        ``body`` is ``message`` serialised (``touched`` included) and is sent
        byte for byte to a peer when it is the only one we know to send to.
        When several known peers get the message, each one's copy also lists
        the others' fingerprints in ``touched``: in a full mesh they then don't
        relay it to each other, and every node delivers it once (Aphlict sends
        one body to all and delivers twice on a three-node mesh). A peer whose
        fingerprint isn't learned yet is always tried and can't be listed.

        This runs on the publish path: it never awaits and never raises.
        """
        if self._closing or not self._peers:
            return  # no mesh (a broker cluster's usual case): nothing to look at
        try:
            touched = message.get("touched")
            if not isinstance(touched, list):
                touched = []
            seen = {fp for fp in touched if isinstance(fp, str)}  # entries may be any JSON
            # Nodes of our broker cluster have it from the broker: not relayed to.
            cluster = [fp for fp in self._cluster() if fp not in seen] if self._cluster else []
            skip = seen.union(cluster)
            targets = [p for p in self._peers if p.fingerprint is None or p.fingerprint not in skip]
            if not targets:
                return
            known = list(dict.fromkeys(p.fingerprint for p in targets if p.fingerprint))
            known.extend(fp for fp in cluster if fp not in known)
            for peer in targets:
                others = [fp for fp in known if fp != peer.fingerprint]
                copy = dumps({**message, "touched": [*touched, *others]}) if others else body
                self._enqueue(peer, instance, copy)
        except Exception:
            # The poster's receipt matters more than a relay; never let a bug here reach it.
            logger.exception("relay failed for instance %s", instance)

    def _enqueue(self, peer: Peer, instance: str, body: bytes) -> None:
        queue = peer._queue
        if len(queue) >= self._queue_limit:
            queue.popleft()
            peer.dropped += 1
            if not peer._dropping:
                peer._dropping = True
                peer._dropped_at_start = peer.dropped - 1
                logger.warning(
                    "peer %s queue is full (%s messages), dropping the oldest",
                    peer.url,
                    self._queue_limit,
                )
        queue.append((instance, body))
        peer._wakeup.set()

    async def close(self, timeout: float = 2.0) -> None:
        """Give queues up to ``timeout`` seconds to drain, then stop. Idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown(timeout))
        # Shielded so a cancelled caller doesn't leave workers or the session half-closed.
        await asyncio.shield(self._close_task)

    async def _shutdown(self, timeout: float) -> None:
        self._closing = True
        for peer in self._peers:
            peer._wakeup.set()
        if self._workers:
            _, pending = await asyncio.wait(
                [
                    asyncio.ensure_future(self._drain(peer, worker))
                    for peer, worker in zip(self._peers, self._workers, strict=True)
                ],
                timeout=timeout,
            )
            for task in (*pending, *self._workers):
                task.cancel()
            await asyncio.gather(*pending, *self._workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        for peer in self._peers:
            if peer._queue:
                logger.warning(
                    "peer %s: %s queued message(s) abandoned at shutdown", peer.url, peer.queued
                )
                peer._queue.clear()

    async def _drain(self, peer: Peer, worker: asyncio.Task[None]) -> None:
        """Let ``worker`` send its queue, unless its peer is down or can't be reached.

        A peer that is failing, or still has no connection after
        ``CONNECT_GRACE`` (a name or address that doesn't answer), would only
        run out the deadline: the shutdown, and a restart, don't wait for it.
        """
        give_up = asyncio.get_running_loop().time() + CONNECT_GRACE
        while not worker.done():
            if peer._failing or (peer._connecting and asyncio.get_running_loop().time() >= give_up):
                worker.cancel()
                return
            await asyncio.wait([worker], timeout=CONNECT_GRACE / 10)

    async def _run(self, peer: Peer) -> None:
        """Send this peer's queue in order until close() asks us to stop."""
        queue = peer._queue
        while True:
            if not queue or (self._closing and peer._failing):
                if self._closing:
                    return
                # No await between the emptiness check and clear(): relay() runs
                # on this loop too, so a wakeup can't be lost in between.
                peer._wakeup.clear()
                await peer._wakeup.wait()
                continue
            instance, body = queue.popleft()
            if peer._dropping and len(queue) <= self._recover_at:
                peer._dropping = False
                logger.info(
                    "peer %s queue recovered after dropping %s message(s)",
                    peer.url,
                    peer.dropped - peer._dropped_at_start,
                )
            await self._send(peer, instance, body)

    async def _send(self, peer: Peer, instance: str, body: bytes) -> None:
        """POST one message; record the outcome. A relay task is a boundary: nothing escapes."""
        session = self._session
        assert session is not None, "worker running without a session"
        # encoded=True: the query is already percent-encoded; yarl must not requote it.
        url = yarl.URL(f"{peer.url}?instance={quote(instance, safe='')}", encoded=True)
        started = time.monotonic()
        peer._connecting = True
        try:
            async with session.post(
                url, data=body, headers=_HEADERS, allow_redirects=False, trace_request_ctx=peer
            ) as response:
                status = response.status
                raw = await response.read()
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._failure(peer, f"timed out after {self._timeout}s")
            return
        except aiohttp.ClientError as exc:
            self._failure(peer, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            logger.debug("unexpected error relaying to %s", peer.url, exc_info=True)
            self._failure(peer, f"{type(exc).__name__}: {exc}")
            return
        finally:
            peer._connecting = False

        peer.latency.observe(time.monotonic() - started)
        if status != 200:
            self._failure(peer, f"http status {status}")
            return
        try:
            receipt = json.loads(raw)
        except ValueError:
            receipt = None
        if not isinstance(receipt, dict):
            self._failure(peer, f"unreadable receipt {raw[:80]!r}")
            return
        self._success(peer, receipt.get("fingerprint"))

    def _success(self, peer: Peer, fingerprint: object) -> None:
        peer.sent += 1
        if isinstance(fingerprint, str) and fingerprint and fingerprint != peer.fingerprint:
            if peer.fingerprint is None:
                logger.info("peer %s has fingerprint %s", peer.url, fingerprint)
            else:
                logger.info(
                    "peer %s fingerprint changed from %s to %s",
                    peer.url,
                    peer.fingerprint,
                    fingerprint,
                )
            peer.fingerprint = fingerprint
        if peer._failing:
            logger.info("peer %s recovered after %s failure(s)", peer.url, peer._failure_streak)
            peer._failing = False
            peer._failure_streak = 0

    def _failure(self, peer: Peer, reason: str) -> None:
        # Only the transition to failing is a warning: a dead peer would
        # otherwise log once per published message.
        peer.failed += 1
        peer.last_error = reason
        peer._failure_streak += 1
        if peer._failing:
            logger.debug("peer %s still failing: %s", peer.url, reason)
        else:
            peer._failing = True
            logger.warning("peer %s failing: %s", peer.url, reason)
