"""Redis Sentinel, end to end: a primary, a replica, three sentinels, real nodes.

Every process is real: ``redis-server`` as primary and replica, three
``redis-server --sentinel`` (quorum 2, the primary counted down after one
silent second), and fastaphlict nodes given ``redis+sentinel://`` in
``FASTAPHLICT_BROKER``.

The failover test makes the loss Redis' asynchronous replication allows
happen every time, not by luck: the replica replicates through a
:class:`StallProxy`, which stops forwarding for half a second before the
primary is killed with SIGKILL, so the messages the primary acknowledged in
that half second never reach the replica that the sentinels then promote.
The nodes must publish them again, and nobody may get one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from fastaphlict.broker.sentinel import Sentinels
from fastaphlict.config import parse_broker_url
from redis_support import (
    FAST,
    SERVICE,
    RedisServer,
    SentinelServer,
    StallProxy,
    require_redis,
    sentinel_url,
    wait_replicating,
    wait_sentinels_ready,
)
from support import (
    TIMEOUT,
    Browser,
    ServerProcess,
    assert_silent,
    child_env,
    eventually,
    free_ports,
    metric,
    post,
    replayed,
    scaled,
    spawn,
    stop,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(60)

#: A primary silent this long is down (the sentinels' ``down-after-milliseconds``).
DOWN_AFTER_MS = int(scaled(1.0) * 1000)
#: Sentinel's ``failover-timeout``: long, because it also delays Sentinel's
#: "fix" of a replica that replicates through an address it does not know
#: (the stalling proxy here); a failover itself takes a few seconds.
FAILOVER_TIMEOUT_MS = int(scaled(30.0) * 1000)
#: Posts a second, to alternating nodes, as the issue's test asks.
RATE = 20
#: How long the replication link stalls before the primary is killed.
STALL = 0.5
#: From the kill until both nodes publish on the new primary.
FAILOVER_WITHIN = scaled(25.0)

PHID = "PHID-USER-1"


class Group:
    """A primary, a replica and three sentinels; stopped on exit.

    ``password`` is the data password (``requirepass`` and ``masterauth``).
    """

    def __init__(self, tmp_path: Path, password: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.password = password
        auth = [] if password is None else ["--masterauth", password]
        self.primary = RedisServer(tmp_path / "primary", password=password, args=auth)
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []

    def all(self) -> list[RedisServer]:
        return [self.primary, *([self.replica] if self.replica else []), *self.sentinels]

    def stop(self) -> None:
        for server in self.all():
            server.stop()


@contextlib.contextmanager
def stopping(group: Group) -> Iterator[Group]:
    try:
        yield group
    finally:
        group.stop()


async def start_group(
    group: Group,
    replicate_from: int | None = None,
    conf: Callable[[int], list[str]] | None = None,
    sentinel_password: str | None = None,
) -> None:
    """Start the primary, the replica (from ``replicate_from``, default the primary) and
    three sentinels (``conf(primary_port)`` their config lines, if given), and wait
    until a failover could happen."""
    if not group.primary.running:
        group.primary.start()
    port = replicate_from or group.primary.port
    auth = [] if group.password is None else ["--masterauth", group.password]
    group.replica = RedisServer(
        group.tmp_path / "replica",
        password=group.password,
        args=["--replicaof", "127.0.0.1", str(port), *auth],
    ).start()
    # In threads: a proxy in between needs this loop to keep running.
    await asyncio.to_thread(wait_replicating, group.replica)
    for n in range(3):
        group.sentinels.append(
            SentinelServer(
                group.tmp_path / f"sentinel{n}",
                group.primary.port,
                down_after_ms=DOWN_AFTER_MS,
                failover_timeout_ms=FAILOVER_TIMEOUT_MS,
                password=sentinel_password,
                conf=None if conf is None else conf(group.primary.port),
            ).start()
        )
    await asyncio.to_thread(wait_sentinels_ready, group.sentinels)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(name: str, env: dict[str, str], *args: str) -> ServerProcess:
        server = spawn(tmp_path / f"{name}.log", *FAST, *args, env=env)
        started.append(server)
        return server

    yield start
    stop(*started)


@contextlib.asynccontextmanager
async def tab(server: ServerProcess, *phids: str) -> AsyncIterator[Browser]:
    async with connect(f"{server.client_url}/", open_timeout=TIMEOUT) as ws:
        browser = Browser(ws)
        await browser.subscribe(*phids)
        yield browser


async def metrics_text(session: aiohttp.ClientSession, server: ServerProcess) -> str:
    async with session.get(f"{server.admin_url}/metrics") as resp:
        return await resp.text()


async def on_primary(session: aiohttp.ClientSession, where: str, *servers: ServerProcess) -> bool:
    """Whether every server's ``/metrics`` names ``where`` as the primary in use."""
    line = f'fastaphlict_broker_primary{{address="{where}"}} 1.0'
    for server in servers:
        if line not in (await metrics_text(session, server)).splitlines():
            return False
    return True


async def up(session: aiohttp.ClientSession, *servers: ServerProcess) -> bool:
    for server in servers:
        if await metric(session, server.admin_url, "fastaphlict_broker_up") != 1:
            return False
    return True


async def collect(browser: Browser, ends: set[str]) -> list[str]:
    """The keys ``browser`` gets until it has every key of ``ends``."""
    keys: list[str] = []
    waiting = set(ends)
    while waiting:
        frame = await asyncio.wait_for(browser.ws.recv(), FAILOVER_WITHIN + TIMEOUT)
        message = json.loads(frame)
        assert message.get("type") == "notification", message
        keys.append(message["key"])
        waiting.discard(message["key"])
    return keys


def check_each_once_in_order(keys: list[str], posted: dict[str, list[str]], where: str) -> None:
    """Every posted key once, and each origin's keys in the order that origin accepted them."""
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, f"{where}: delivered more than once: {repeated}"
    expected = {k for origin in posted.values() for k in origin}
    missing, unexpected = sorted(expected - set(keys)), sorted(set(keys) - expected)
    assert not missing and not unexpected, f"{where}: missing {missing}, unexpected {unexpected}"
    for origin, sent in posted.items():
        assert [k for k in keys if k in set(sent)] == sent, f"{where}: {origin}'s out of order"


def logs(*servers: ServerProcess | RedisServer) -> str:
    return "\n".join(f"--- {s.log_path}:\n{s.log()[-4000:]}" for s in servers)


async def test_a_primary_killed_mid_stream_loses_nothing_and_repeats_nothing(
    tmp_path: Path, nodes: Any
) -> None:
    """The issue's test: 20 posts/s to alternating nodes, SIGKILL of the primary mid-stream.

    The replication link stalls before the kill, so the primary dies holding
    acknowledged messages the replica never got. Each tab on each node gets
    every message once, in order per origin; a node started after the
    failover replays every one of them from the new primary's history.
    """
    require_redis()
    group = Group(tmp_path)
    with stopping(group):
        group.primary.start()
        async with StallProxy("127.0.0.1", group.primary.port) as link:
            await start_group(group, replicate_from=link.port)
            assert group.replica is not None
            old, new = f"127.0.0.1:{group.primary.port}", f"127.0.0.1:{group.replica.port}"
            env = {"FASTAPHLICT_BROKER": sentinel_url(group.sentinels)}
            a, b = nodes("a", env), nodes("b", env)
            async with aiohttp.ClientSession() as session:
                try:
                    await wait_healthy(a, session)
                    await wait_healthy(b, session)
                    await eventually(
                        lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                    )
                    await failover_mid_stream(session, group, link, a, b, nodes, env, old, new)
                except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
                    raise AssertionError(f"{exc}\n{logs(a, b, *group.sentinels)}") from exc


async def failover_mid_stream(
    session: aiohttp.ClientSession,
    group: Group,
    link: StallProxy,
    a: ServerProcess,
    b: ServerProcess,
    nodes: Any,
    env: dict[str, str],
    old: str,
    new: str,
) -> None:
    posted: dict[str, list[str]] = {"a": [], "b": []}
    ends = {"end-a", "end-b"}
    # Two tabs on each node: one subscribed to the PHID alone, one among others.
    async with (
        tab(a, PHID) as ta1,
        tab(a, "PHID-OTHER", PHID) as ta2,
        tab(b, PHID) as tb1,
        tab(b, PHID, "PHID-OTHER") as tb2,
    ):
        tabs = {"a1": ta1, "a2": ta2, "b1": tb1, "b2": tb2}
        readers = [asyncio.create_task(collect(t, ends)) for t in tabs.values()]
        try:
            got = await post_through_a_failover(session, group, link, a, b, posted, readers, new)
        finally:
            for reader in readers:
                reader.cancel()
        for browser in tabs.values():
            await assert_silent(browser)
    for name, keys in zip(tabs, got, strict=True):
        check_each_once_in_order(keys, posted, f"tab {name}")
    # What the old primary alone had was published again, and only it is
    # in the new primary's history once more: a node started now replays
    # the whole stream, each message once.
    c = nodes("c", env)
    await wait_healthy(c, session)
    await eventually(lambda: up(session, c), scaled(15.0), "node c up", every=0.02)
    async with tab(c, PHID) as tc:
        keys = await replayed(tc)
    check_each_once_in_order(keys, posted, "the replay on a node started after the failover")
    for server in (a, b):
        text = await metrics_text(session, server)
        assert "fastaphlict_broker_primary_changes_total 1.0" in text.splitlines()
        assert await metric(session, server.admin_url, "fastaphlict_broker_republished_total") > 0
        assert f"broker primary is now {new} (was {old})" in server.log()


async def post_through_a_failover(
    session: aiohttp.ClientSession,
    group: Group,
    link: StallProxy,
    a: ServerProcess,
    b: ServerProcess,
    posted: dict[str, list[str]],
    readers: list[asyncio.Task[list[str]]],
    new: str,
) -> list[list[str]]:
    """Post at RATE to alternating nodes; stall the replication, kill the primary, go on."""
    counter = itertools.count()

    async def post_one() -> None:
        n = next(counter)
        origin, server = ("a", a) if n % 2 == 0 else ("b", b)
        key = f"{origin}{n}"
        resp = await post(
            session,
            server.admin_url,
            {"key": key, "type": "notification", "subscribers": [PHID]},
        )
        assert resp.status == 200, key
        posted[origin].append(key)

    async def post_for(seconds: float) -> None:
        for _ in range(round(seconds * RATE)):
            await post_one()
            await asyncio.sleep(1 / RATE)

    await post_for(1.0)
    link.stall()  # the replica gets nothing more: the primary alone acknowledges
    await post_for(STALL)
    group.primary.kill()
    link.cut()  # what the proxy held dies with the primary
    # Posts go on through the failover, until both nodes publish to the new primary.
    deadline = asyncio.get_running_loop().time() + FAILOVER_WITHIN
    while True:
        await post_for(0.5)
        if await on_primary(session, new, a, b) and await up(session, a, b):
            break
        assert asyncio.get_running_loop().time() < deadline, "no failover in time"
    await post_for(1.0)
    for origin, server in (("a", a), ("b", b)):
        resp = await post(
            session,
            server.admin_url,
            {"key": f"end-{origin}", "type": "notification", "subscribers": [PHID]},
        )
        assert resp.status == 200
        posted[origin].append(f"end-{origin}")
    return list(await asyncio.gather(*readers))


def test_only_a_switch_of_our_service_moves_the_broker() -> None:
    """``+switch-master`` names the service: another one's failover is none of ours."""
    config = parse_broker_url("redis+sentinel://s1,s2/mymaster/0")
    switches: list[tuple[str, int]] = []
    sentinels = Sentinels(config, timeout=1.0, on_switch=lambda h, p: switches.append((h, p)))
    for data in (
        b"other 10.0.0.1 6379 10.0.0.2 6379",
        b"mymaster 10.0.0.1 6379 10.0.0.2",
        b"mymaster 10.0.0.1 6379 10.0.0.2 port",
        b"mymaster 10.0.0.1 6379 10.0.0.2 6380",
    ):
        sentinels._on_push([b"message", b"+switch-master", data])
    sentinels._on_push([b"subscribe", b"+switch-master", 1])
    assert switches == [("10.0.0.2", 6380)]


# -- the example of docs/clusters.md ----------------------------------------------------

CLUSTERS = Path(__file__).resolve().parents[1] / "docs" / "clusters.md"


def readme_block(name: str) -> list[str]:
    """The lines of docs/clusters.md's fenced block marked ``<!-- sentinel-example: name -->``."""
    lines = CLUSTERS.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- sentinel-example: {name} -->") + 1
    assert lines[start].startswith("```"), f"no block after the {name} marker"
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def readme_node_env(sentinels: list[SentinelServer]) -> tuple[dict[str, str], list[str]]:
    """The node command of docs/clusters.md: its variables (sentinels moved here) and its words."""
    command = " ".join(line.rstrip("\\").strip() for line in readme_block("node"))
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    addresses = iter(f"127.0.0.1:{s.port}" for s in sentinels)
    env["FASTAPHLICT_BROKER"] = re.sub(
        r"10\.0\.0\.\d+:26379", lambda _: next(addresses), env["FASTAPHLICT_BROKER"]
    )
    return env, words


def readme_sentinel_conf(primary_port: int) -> list[str]:
    """The sentinel config of docs/clusters.md, for a primary on ``127.0.0.1:primary_port``."""
    conf = readme_block("sentinel.conf")
    assert conf[0] == "port 26379"  # each test sentinel gets a free port instead
    return [line.replace("10.0.0.11 6379", f"127.0.0.1 {primary_port}") for line in conf[1:]]


def conf_value(key: str) -> str:
    """The last word of the sentinel config's line (docs/clusters.md) starting with ``key``."""
    [line] = [line for line in readme_block("sentinel.conf") if line.startswith(key + " ")]
    return line.split()[-1]


async def test_the_readme_sentinel_example_runs_and_follows_a_failover(
    tmp_path: Path, nodes: Any
) -> None:
    """The sentinel config and node command of docs/clusters.md, run as written (addresses aside).

    Two nodes deliver to each other's tabs; a manual failover (``SENTINEL
    FAILOVER``: the old primary stays up, as a demoted one would) moves both
    to the new primary; a node without the sentinels' password is refused,
    and no log holds either password.
    """
    require_redis()
    data_password = conf_value("sentinel auth-pass")
    sentinel_password = conf_value("requirepass")
    group = Group(tmp_path, password=data_password)
    with stopping(group):
        await start_group(group, conf=readme_sentinel_conf, sentinel_password=sentinel_password)
        assert group.replica is not None
        env, words = readme_node_env(group.sentinels)
        assert words[0].endswith("/fastaphlict") and words[1].startswith("--config=")
        assert env["FASTAPHLICT_BROKER_SENTINEL_PASSWORD"] == sentinel_password
        checked = subprocess.run(
            [sys.executable, "-m", "fastaphlict", "--test"],
            env={**child_env(), **env},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert checked.returncode == 0 and checked.stdout == "Configuration test OK.\n", checked
        # The documented command, with the test's own ports instead of its config file.
        a, b = nodes("a", env), nodes("b", env)
        async with aiohttp.ClientSession() as session:
            try:
                await wait_healthy(a, session)
                await wait_healthy(b, session)
                await eventually(
                    lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                )
                assert await on_primary(session, f"127.0.0.1:{group.primary.port}", a, b)
                async with tab(a, PHID) as ta, tab(b, PHID) as tb:
                    await deliver_both_ways(session, a, b, ta, tb, "before")
                    group.sentinels[0].command("SENTINEL", "FAILOVER", SERVICE)
                    new = f"127.0.0.1:{group.replica.port}"
                    await eventually(
                        lambda: on_primary(session, new, a, b),
                        scaled(20.0),
                        "both on the new primary",
                        every=0.02,
                    )
                    await eventually(
                        lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                    )
                    # The old primary is still up and still a primary (Sentinel demotes
                    # it seconds later): the nodes moved on the sentinels' word.
                    for server in (a, b):
                        assert f"the sentinels announce {new} as the new primary" in server.log()
                    await deliver_both_ways(session, a, b, ta, tb, "after")
                without = {k: v for k, v in env.items() if "SENTINEL" not in k}
                d = nodes("d", without)
                await wait_healthy(d, session)
                assert await metric(session, d.admin_url, "fastaphlict_broker_up") == 0
            except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{logs(a, b, *group.sentinels)}") from exc
        assert "unreachable at start" in d.log() and "NOAUTH" in d.log(), d.log()
        for server in (a, b, d):
            assert data_password not in server.log() and sentinel_password not in server.log()


async def deliver_both_ways(
    session: aiohttp.ClientSession,
    a: ServerProcess,
    b: ServerProcess,
    ta: Browser,
    tb: Browser,
    tag: str,
) -> None:
    """A post to each node reaches both tabs, once each (then nothing else is pending)."""
    for origin, server in (("a", a), ("b", b)):
        resp = await post(
            session,
            server.admin_url,
            {"key": f"{tag}-{origin}", "type": "notification", "subscribers": [PHID]},
        )
        assert resp.status == 200
    for browser in (ta, tb):
        keys = sorted([(await browser.recv())["key"] for _ in range(2)])
        assert keys == [f"{tag}-a", f"{tag}-b"]
        await assert_silent(browser)


# -- sentinels down, and a sentinel that names a replica ---------------------------


async def until_logged(server: ServerProcess, text: str, within: float = scaled(15.0)) -> None:
    async def check() -> bool:
        return text in server.log()

    await eventually(
        check, within, f"{text!r} in {server.log_path.name}\n{server.log()}", every=0.02
    )


async def test_another_sentinel_answers_and_none_answering_means_down_until_one_is_back(
    tmp_path: Path, nodes: Any
) -> None:
    """The first sentinel of the URL is down: the next answers. All down: the broker is
    down (posts buffered) when its connection goes, and back when one sentinel is."""
    require_redis()
    group = Group(tmp_path)
    with stopping(group):
        await start_group(group)
        group.sentinels[0].stop()
        env = {"FASTAPHLICT_BROKER": sentinel_url(group.sentinels)}
        # At debug level, each failed attempt is logged with its reason.
        a, b = nodes("a", env, "--log-level=debug"), nodes("b", env)
        async with aiohttp.ClientSession() as session:
            try:
                await wait_healthy(a, session)
                await wait_healthy(b, session)
                await eventually(
                    lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                )
                async with tab(a, PHID) as ta, tab(b, PHID) as tb:
                    await deliver_both_ways(session, a, b, ta, tb, "one-down")
                    for sentinel in group.sentinels[1:]:
                        sentinel.stop()
                    # The primary restarts (same port, same data): the nodes must ask again.
                    group.primary.stop()
                    group.primary.start()
                    # The primary is back, but only the sentinels may say so.
                    await until_logged(a, "still down: RedisError: no sentinel answered")
                    assert await metric(session, a.admin_url, "fastaphlict_broker_up") == 0
                    resp = await post(
                        session,
                        a.admin_url,
                        {"key": "while-down", "type": "notification", "subscribers": [PHID]},
                    )
                    assert resp.status == 200
                    assert (await ta.recv())["key"] == "while-down", "its own tab at once"
                    group.sentinels[2].start()
                    await eventually(
                        lambda: up(session, a, b), scaled(20.0), "both nodes back", every=0.02
                    )
                    assert (await tb.recv())["key"] == "while-down", "the other node's, once back"
                    await deliver_both_ways(session, a, b, ta, tb, "back")
            except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{logs(a, b)}") from exc


async def test_a_sentinel_that_names_a_replica_is_not_believed(tmp_path: Path, nodes: Any) -> None:
    """``ROLE`` is checked: a sentinel's stale answer (here: one watching a replica) is
    refused with its reason, and the node stays down rather than publish to a replica."""
    require_redis()
    primary = RedisServer(tmp_path / "primary")
    with primary:
        with RedisServer(
            tmp_path / "replica", args=["--replicaof", "127.0.0.1", str(primary.port)]
        ) as replica:
            await asyncio.to_thread(wait_replicating, replica)
            with SentinelServer(tmp_path / "sentinel", replica.port, quorum=1) as sentinel:
                a = nodes("a", {"FASTAPHLICT_BROKER": sentinel_url([sentinel])})
                async with aiohttp.ClientSession() as session:
                    await wait_healthy(a, session)
                    await until_logged(
                        a, f"127.0.0.1:{replica.port}, named by the sentinels, is a slave"
                    )
                    assert await metric(session, a.admin_url, "fastaphlict_broker_up") == 0


async def test_rediss_sentinel_speaks_tls_to_the_sentinels_and_the_primary(
    tmp_path: Path, nodes: Any
) -> None:
    """``rediss+sentinel://``: the sentinel and the primary both only over verified TLS
    (each also has a plain port, for the test's own checks only)."""
    require_redis()
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("key", "cert", "ca")}
    cert.private_key_pem.write_to_path(files["key"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    ca.cert_pem.write_to_path(files["ca"])
    tls = [
        f"tls-cert-file {files['cert']}",
        f"tls-key-file {files['key']}",
        f"tls-ca-cert-file {files['ca']}",
        "tls-auth-clients no",
    ]
    primary_tls, sentinel_tls = free_ports(2)
    args = [word for line in tls for word in ("--" + line.split()[0], line.split()[1])]
    with RedisServer(tmp_path / "primary", args=["--tls-port", str(primary_tls), *args]):
        conf = [
            f"tls-port {sentinel_tls}",
            "tls-replication yes",  # the sentinel speaks TLS to the primary too
            *tls,
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_tls} 1",
        ]
        with SentinelServer(tmp_path / "sentinel", primary_tls, conf=conf):
            url = f"rediss+sentinel://127.0.0.1:{sentinel_tls}/{SERVICE}/0"
            env = {"FASTAPHLICT_BROKER": url, "FASTAPHLICT_BROKER_CA_FILE": str(files["ca"])}
            a, b = nodes("a", env), nodes("b", env)
            async with aiohttp.ClientSession() as session:
                try:
                    await wait_healthy(a, session)
                    await wait_healthy(b, session)
                    await eventually(
                        lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                    )
                    assert await on_primary(session, f"127.0.0.1:{primary_tls}", a, b)
                    async with tab(a, PHID) as ta, tab(b, PHID) as tb:
                        await deliver_both_ways(session, a, b, ta, tb, "tls")
                    # The system's CAs don't know this one: the sentinel is not believed.
                    stranger = nodes("stranger", {"FASTAPHLICT_BROKER": url})
                    await wait_healthy(stranger, session)
                    assert await metric(session, stranger.admin_url, "fastaphlict_broker_up") == 0
                    assert "certificate verify failed" in stranger.log()
                except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
                    raise AssertionError(f"{exc}\n{logs(a, b)}") from exc


# -- the same rule without Sentinel ------------------------------------------------------


async def test_behind_a_fixed_address_a_redis_that_lost_the_last_writes_gets_them_again(
    tmp_path: Path, nodes: Any
) -> None:
    """A failover behind a virtual IP looks like this to a node: the same address, another
    server (``run_id``), missing what the old one acknowledged last. Here that is a Redis
    restarted without its data. The nodes publish their kept messages again: the history
    is whole for a node started afterwards, and no tab gets a message twice."""
    require_redis()
    redis = RedisServer(tmp_path / "redis")
    with redis:
        env = {"FASTAPHLICT_BROKER": redis.url}
        a, b = nodes("a", env), nodes("b", env)
        async with aiohttp.ClientSession() as session:
            try:
                await wait_healthy(a, session)
                await wait_healthy(b, session)
                await eventually(
                    lambda: up(session, a, b), scaled(15.0), "both nodes up", every=0.02
                )
                async with tab(a, PHID) as ta, tab(b, PHID) as tb:
                    await deliver_both_ways(session, a, b, ta, tb, "before")
                    redis.kill()
                    shutil.rmtree(redis.directory / "appendonlydir")
                    redis.start()
                    await until_logged(a, "publishing again the 1 message(s)")
                    await until_logged(b, "publishing again the 1 message(s)")
                    await eventually(
                        lambda: up(session, a, b), scaled(15.0), "both nodes back", every=0.02
                    )
                    # Published again, after what each tab already had: "after-*" must
                    # be the next frames, the repeats dropped.
                    await deliver_both_ways(session, a, b, ta, tb, "after")
                c = nodes("c", env)
                await wait_healthy(c, session)
                await eventually(lambda: up(session, c), scaled(15.0), "node c up", every=0.02)
                async with tab(c, PHID) as tc:
                    keys = await replayed(tc)
                check_each_once_in_order(
                    keys,
                    {"a": ["before-a", "after-a"], "b": ["before-b", "after-b"]},
                    "the replay on a node started afterwards",
                )
            except (AssertionError, TimeoutError, asyncio.TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{logs(a, b)}") from exc
