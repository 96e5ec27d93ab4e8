"""The doctor's steps: each one a real request over the network, each one bounded in time.

A client of the public protocol only (the admin port's ``POST /``,
``/status/`` and ``/metrics``; the client port's WebSocket commands), never
the server's own modules: it checks a Node Aphlict as well as a fastaphlict,
and a fastaphlict of another version. Every step has a time limit, and a
step that hangs past it fails with a sentence, so the doctor never hangs.

Chains stop at their first failure. Admin servers go first (so a delivery
has an admin to post to); then each client server; then, with several
servers, the cluster: a post to each admin must reach every client server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from fastaphlict.doctor import network
from fastaphlict.doctor.handshake import handshake
from fastaphlict.doctor.meanings import (
    NGINX_SECTION,
    Failure,
    status_refusal,
    upgrade_refusal,
)
from fastaphlict.doctor.network import close, ms, open_to
from fastaphlict.doctor.report import Check
from fastaphlict.doctor.session import PING, PONG, hold_idle, key_of, until
from fastaphlict.doctor.targets import Target

__all__ = ["MESSAGE_TYPE", "Options", "diagnose"]

#: The test message's type: ``JX.Aphlict``'s handlers act on Phorge's own
#: types (notification, message, workboards) and ignore any other.
MESSAGE_TYPE = "fastaphlict.doctor"


@dataclass(frozen=True)
class Options:
    origin: str | None = None
    ca_file: str | None = None
    timeout: float = 5.0
    idle: float | None = None


class Skip(Exception):
    """A step that does not apply here; the message says why."""


class Doctor:
    """One run over a set of targets; ``checks`` fills as the steps run."""

    def __init__(self, targets: Sequence[Target], options: Options) -> None:
        self.targets = targets
        self.options = options
        self.timeout = options.timeout
        self.ssl = ssl.create_default_context(cafile=options.ca_file)
        self.checks: list[Check] = []
        self.run_id = secrets.token_hex(6)
        #: A PHID no Phorge object has: nobody else subscribes to it.
        self.phid = f"PHID-DOCTOR-{self.run_id}"
        self._sent = 0

    # -- the step runner

    async def step(
        self, target: Target, name: str, action: Callable[[], Awaitable[str]], bound: float = 0
    ) -> bool:
        """Run one step under its time limit; record its line; whether it passed."""
        limit = bound or self.timeout
        try:
            figure = await asyncio.wait_for(action(), limit + 1.0)
        except Skip as skipped:
            self.checks.append(Check(target.name, name, None, str(skipped)))
            return True
        except Failure as exc:
            failed = exc
        except asyncio.TimeoutError:
            failed = Failure(
                f"no answer within {limit:g} s.",
                "check that the server (and any proxy) at this address answers.",
            )
        except Exception as exc:  # a bug, or an answer nobody foresaw: keep the report going
            failed = Failure(
                f"unexpected error: {exc!r}.",
                "report this to fastaphlict with the command line that showed it.",
            )
        else:
            self.checks.append(Check(target.name, name, True, figure))
            return True
        self.checks.append(Check(target.name, name, False, None, failed.cause, failed.fix))
        return False

    def skip(self, target: Target, name: str, why: str) -> None:
        self.checks.append(Check(target.name, name, None, why))

    # -- the chains

    async def run(self) -> list[Check]:
        admins = [t for t in self.targets if t.kind == "admin"]
        clients = [t for t in self.targets if t.kind == "client"]
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as self.session:
            live_admins = [admin for admin in admins if await self.admin_chain(admin)]
            live_clients = [c for c in clients if await self.client_chain(c, live_admins)]
            if (len(admins) > 1 or len(clients) > 1) and live_admins and live_clients:
                await self.cluster(live_admins, live_clients)
        return self.checks

    async def reach(self, target: Target) -> bool:
        """dns, tcp, and tls where the entry says https."""
        if not await self.step(target, "dns", lambda: self.dns(target)):
            return False
        if not await self.step(target, "tcp", lambda: self.tcp(target)):
            return False
        return not target.secure or await self.step(target, "tls", lambda: self.tls(target))

    async def admin_chain(self, admin: Target) -> bool:
        """Whether this admin server is fit to post the test messages to."""
        if not await self.reach(admin):
            return False
        if not await self.step(admin, "status", lambda: self.status(admin)):
            return False
        await self.step(admin, "broker", lambda: self.broker(admin))
        return True

    async def client_chain(self, client: Target, admins: Sequence[Target]) -> bool:
        if not await self.reach(client):
            return False
        refused: list[bool] = []
        if not await self.step(client, "upgrade", lambda: self.upgrade(client, refused)):
            return False
        if self.options.origin is None:
            self.skip(client, "origin", "not checked: give --origin with Phorge's base URI")
        elif not await self.step(client, "origin", lambda: self.origin(refused)):
            return False
        async with contextlib.AsyncExitStack() as stack:
            sockets: list[aiohttp.ClientWebSocketResponse] = []

            async def subscribe() -> str:
                ws, figure = await self.subscribed(client, stack)
                sockets.append(ws)
                return figure

            if not await self.step(client, "subscribe", subscribe):
                return False
            (ws,) = sockets
            if not admins:
                self.skip(client, "delivery", "no admin server passed its checks")
                return False
            keys: list[str] = []
            if not await self.step(client, "delivery", lambda: self.delivery(admins[0], ws, keys)):
                return False
            if not await self.step(client, "replay", lambda: self.replay(ws, keys[0])):
                return False
            idle = self.options.idle
            if idle is not None and not await self.step(
                client, "idle", lambda: self.idle(ws, idle), bound=idle + 2 * self.timeout
            ):
                return False
        return True

    # -- reaching a server

    async def dns(self, target: Target) -> str:
        return await network.dns(target, self.timeout)

    async def tcp(self, target: Target) -> str:
        return await network.tcp(target, self.timeout)

    async def tls(self, target: Target) -> str:
        return await network.tls(target, self.ssl, self.timeout)

    # -- the admin port

    async def get(self, url: str) -> tuple[int, bytes]:
        try:
            async with self.session.get(url, ssl=self.ssl, allow_redirects=False) as resp:
                return resp.status, await bounded(resp, f"GET {url}")
        except aiohttp.ClientError as exc:
            raise Failure(f"GET {url} failed: {exc}.", "check the admin entry.") from exc

    async def status(self, admin: Target) -> str:
        started = time.monotonic()
        code, body = await self.get(admin.at("/status/"))
        in_time(started, f"{admin.at('/status/')} answered")
        if code != 200:
            raise Failure(*status_refusal(code, body))
        try:
            status = json.loads(body)
            version, tabs = status["version"], status["clients.active"]
        except (ValueError, TypeError, KeyError) as exc:
            raise Failure(
                "/status/ answered 200 but not with Aphlict's status object.",
                "point the admin entry at the notification server's admin port.",
            ) from exc
        return f"version {version}, {tabs} tabs open, in {ms(started)}"

    async def broker(self, admin: Target) -> str:
        code, body = await self.get(admin.at("/metrics"))
        if code == 404:
            raise Skip("skipped: no /metrics, not fastaphlict (Node Aphlict has no broker)")
        if code != 200:
            raise Skip(f"skipped: /metrics answered HTTP {code}")
        samples = metric_samples(body)
        up = samples.get("fastaphlict_broker_up")
        if up is None:
            raise Skip("skipped: this node has no broker (a single node, or a mesh)")
        if up != 1:
            raise Failure(
                "this node is not on its broker: it cannot reach Redis, so messages posted "
                "here reach only its own tabs, and other nodes' messages never reach them.",
                "check that Redis runs and that the node's --broker URL reaches it "
                "(docs/clusters.md).",
            )
        nodes = samples.get("fastaphlict_broker_nodes", 0.0)
        return f"up, {nodes:.0f} other nodes seen"

    async def post(self, admin: Target, key: str, phid: str) -> None:
        """Post the test message exactly as Phorge's PHP does: raw JSON, form content type."""
        # Phorge adds Filesystem::readRandomCharacters(32): a-z and 2-7, base32's
        # alphabet, so 20 random bytes in base32 are 32 such characters.
        unique = base64.b32encode(secrets.token_bytes(20)).decode().lower()
        body = json.dumps(
            {"key": key, "type": MESSAGE_TYPE, "subscribers": [phid], "uniqueID": unique}
        )
        started = time.monotonic()
        try:
            async with self.session.post(
                admin.url,
                data=body.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                ssl=self.ssl,
                allow_redirects=False,
            ) as resp:
                await bounded(resp, f"the post to {admin.url}")
                code = resp.status
        except aiohttp.ClientError as exc:
            raise Failure(
                f"posting to {admin.url} failed: {exc}.", "check the admin entry."
            ) from exc
        if code != 200:
            raise Failure(
                f"{admin.url} answered the post with HTTP {code}, not 200.",
                "check the admin entry and the server's log.",
            )
        in_time(started, f"{admin.url} answered the post")

    def new_key(self) -> str:
        self._sent += 1
        return f"doctor-{self.run_id}-{self._sent}"

    # -- the client port

    async def upgrade(self, client: Target, refused: list[bool]) -> str:
        """The browser's upgrade request on the exact URL, read by hand to report what came back."""
        started = time.monotonic()
        try:
            reader, writer = await open_to(
                client, self.ssl if client.secure else None, self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise Failure(f"cannot connect again: {exc}.", "check the server.") from exc
        origin = self.options.origin
        try:
            answer = await handshake(reader, writer, client, origin, self.timeout)
        finally:
            await close(writer)
        if answer.code == 101:
            return f"101 Switching Protocols in {ms(started)}"
        if answer.code == 403 and b"origin" in answer.body.lower() and origin:
            refused.append(True)
            return f"403 for the Origin (the path reaches the server) in {ms(started)}"
        raise Failure(
            *upgrade_refusal(answer.code, answer.content_type, answer.body, client.path, origin)
        )

    async def origin(self, refused: list[bool]) -> str:
        origin = self.options.origin
        if refused:
            raise Failure(
                f"the server refuses the Origin {origin}: browsers on Phorge's pages get "
                "no socket.",
                f"if {origin} is Phorge's base URI, add it to the server's --allowed-origins "
                "(FASTAPHLICT_ALLOWED_ORIGINS); if not, pass Phorge's base URI as --origin.",
            )
        scheme = urlsplit(origin or "").scheme
        if scheme in ("http", "https") and not any(
            t.kind == "client" and t.secure == (scheme == "https") for t in self.targets
        ):
            # PhabricatorStandardPageView: getEnabledClientServers($with_protocol).
            raise Failure(
                f"Phorge's {scheme} pages use only client entries with protocol {scheme}; "
                "none is enabled, so browsers there open no socket.",
                f'enable a client entry with "protocol": "{scheme}" (behind the proxy that '
                "serves Phorge), or pass Phorge's real base URI as --origin.",
            )
        return f"{origin} accepted"

    async def connect(
        self, client: Target, stack: contextlib.AsyncExitStack
    ) -> aiohttp.ClientWebSocketResponse:
        try:
            return await stack.enter_async_context(
                self.session.ws_connect(
                    client.url,
                    origin=self.options.origin,
                    ssl=self.ssl if client.secure else False,
                    autoping=True,
                    heartbeat=None,
                )
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise Failure(
                f"the WebSocket did not open: {exc}.", f"check the proxy ({NGINX_SECTION})."
            ) from exc

    async def subscribed(
        self, client: Target, stack: contextlib.AsyncExitStack, phid: str | None = None
    ) -> tuple[aiohttp.ClientWebSocketResponse, str]:
        """A socket subscribed to the run's PHID, proven by a ping/pong round."""
        ws = await self.connect(client, stack)
        started = time.monotonic()
        await ws.send_str(json.dumps({"command": "subscribe", "data": [phid or self.phid]}))
        await ws.send_str(PING)
        await self.until(ws, lambda frame: frame == PONG, "a pong to the ping")
        return ws, f"subscribed, pong in {ms(started)}"

    async def until(
        self, ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[str], bool], what: str
    ) -> list[str]:
        return await until(ws, wanted, what, self.timeout)

    async def delivery(
        self, admin: Target, ws: aiohttp.ClientWebSocketResponse, keys: list[str]
    ) -> str:
        key = self.new_key()
        started = time.monotonic()
        await self.post(admin, key, self.phid)
        try:
            await self.until(ws, lambda frame: key_of(frame) == key, "test message")
        except Failure as failed:
            raise Failure(
                f"the test message posted to {admin.url} did not arrive on this socket within "
                f"{self.timeout:g} s: the admin and client entries do not reach the same "
                "server or cluster (or not the same instance).",
                "make both entries name one server, or give the nodes one --broker.",
            ) from failed
        keys.append(key)
        return f"posted to {admin.url}, arrived in {ms(started)}"

    async def replay(self, ws: aiohttp.ClientWebSocketResponse, key: str) -> str:
        started = time.monotonic()
        await ws.send_str('{"command":"replay","data":{"age":60000}}')
        await ws.send_str(PING)
        frames = await self.until(ws, lambda frame: frame == PONG, "answer to replay")
        if not any(key_of(frame) == key for frame in frames):
            raise Failure(
                "replay did not return the test message: tabs that reconnect miss what was "
                "posted meanwhile.",
                "check the server's history settings and log.",
            )
        return f"returned the test message in {ms(started)}"

    async def idle(self, ws: aiohttp.ClientWebSocketResponse, seconds: float) -> str:
        return await hold_idle(ws, seconds, self.timeout)

    # -- several servers

    async def cluster(self, admins: Sequence[Target], clients: Sequence[Target]) -> None:
        """A post to each admin reaches a socket on every client server."""
        phid = f"{self.phid}-CLUSTER"
        async with contextlib.AsyncExitStack() as stack:
            sockets = []
            for client in clients:
                try:
                    ws, _ = await asyncio.wait_for(
                        self.subscribed(client, stack, phid), self.timeout + 1
                    )
                except Exception:  # its own chain already said what is wrong
                    continue
                sockets.append((client, ws))
            for admin in admins:
                # The post and the wait each have --timeout.
                await self.step(
                    admin,
                    "cluster",
                    lambda admin=admin: self.reaches_all(admin, sockets, phid),
                    bound=2 * self.timeout,
                )

    async def reaches_all(
        self,
        admin: Target,
        sockets: Sequence[tuple[Target, aiohttp.ClientWebSocketResponse]],
        phid: str,
    ) -> str:
        key = self.new_key()
        started = time.monotonic()
        await self.post(admin, key, phid)
        # All sockets wait at once, under one deadline: in turn, two missed
        # clients would spend the step's whole time limit on the first.
        waits = await asyncio.gather(
            *(
                self.until(ws, lambda frame: key_of(frame) == key, "test message")
                for _, ws in sockets
            ),
            return_exceptions=True,
        )
        missed = [
            client.url
            for (client, _), got in zip(sockets, waits, strict=True)
            if isinstance(got, BaseException)
        ]
        if missed:
            raise Failure(
                f"a post here did not reach {', '.join(missed)}: the servers are not one cluster.",
                "give every node the same --broker, or list each node in the others' "
                "cluster peers (docs/clusters.md).",
            )
        return f"reached all {len(sockets)} client servers in {ms(started)}"


#: Phorge gives up on an admin call after this long
#: (``PhabricatorNotificationServerRef::newFuture``: ``setTimeout(2)``), and
#: drops a post silently when it does.
PHORGE_GIVES_UP = 2.0


def in_time(started: float, what: str) -> None:
    """Failure if the admin's answer came later than Phorge waits for it."""
    took = time.monotonic() - started
    if took > PHORGE_GIVES_UP:
        raise Failure(
            f"{what} in {took:.1f} s; Phorge gives up on admin calls at "
            f"{PHORGE_GIVES_UP:g} s (and drops its posts silently).",
            "check what slows the admin port: the server's load, a proxy in front of it.",
        )


#: More than any admin answer holds (a /metrics page is a few KiB): past it, stop reading.
MOST = 64 * 1024


async def bounded(resp: aiohttp.ClientResponse, what: str) -> bytes:
    """The body, read up to :data:`MOST`; Failure if there is more (an endless body, say)."""
    body = bytearray()
    while chunk := await resp.content.read(MOST + 1 - len(body)):
        body += chunk
        if len(body) > MOST:
            raise Failure(
                f"{what} answered with a body over {MOST // 1024} KiB; the notification "
                "server's answers are a few KiB.",
                "point the admin entry at the notification server's admin port.",
            )
    return bytes(body)


def metric_samples(body: bytes) -> dict[str, float]:
    """``fastaphlict_broker_*`` samples of a Prometheus text page, read leniently.

    The value is the first token after the name (a timestamp may follow);
    a line without a number is ignored rather than trusted.
    """
    samples: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("fastaphlict_broker_"):
            continue
        try:
            samples[fields[0]] = float(fields[1])
        except ValueError:
            continue
    return samples


async def diagnose(targets: Sequence[Target], options: Options) -> list[Check]:
    """Run every check on ``targets``; the lines, in order."""
    return await Doctor(targets, options).run()
