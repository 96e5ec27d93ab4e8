"""The README's nginx block, run by a real nginx in front of a real server.

The block (``<!-- docs-test: nginx -->``) goes into an ``http {}`` of a
scratch nginx.conf as written, with four words replaced: the two certificate
paths (by a throwaway CA's), the listen port 443 (by a free one on loopback)
and the client port 22280 (by the test server's). ``nginx -t`` must accept
it; then a tab connects through it on ``wss://.../ws/``, subscribes and gets a
post, another does the same for an instance under ``/ws/~instance/``, and a
plain GET (Phorge's check of a client server) gets 501 through the proxy.

The cluster's upstream block (``<!-- docs-test: nginx upstream -->``) goes
in front of two real nodes sharing a real Redis, their addresses replaced by
the nodes' ports: tabs land on both nodes, a post to one reaches both, and
with one node stopped a new tab still connects, to the other.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
import trustme
from websockets.asyncio.client import connect

from docs_support import labelled
from fastaphlict.config import Limits
from nginx_support import nginx, nginx_command, nginx_conf, replace_once, require_nginx
from redis_support import RedisServer, until_up
from support import (
    TIMEOUT,
    Browser,
    ServerProcess,
    free_ports,
    post,
    run,
    scaled,
    settings,
    spawn,
    stop,
)


def test_nginx_accepts_the_readme_block(tmp_path: Path) -> None:
    listen, upstream = free_ports(2)
    conf = nginx_conf(tmp_path, trustme.CA(), listen, f"127.0.0.1:{upstream}")
    done = subprocess.run(
        nginx_command(conf, "-t"), capture_output=True, text=True, timeout=scaled(30)
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_the_readme_proxy_timeouts_leave_dead_sockets_to_the_server() -> None:
    """ "Keep both nginx timeouts well above twice --ping-interval": the block does."""
    block = labelled("nginx").text
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        found = re.search(rf"^{directive} (\d+)s;$", block, re.M)
        assert found, f"the nginx block sets {directive} in seconds"
        assert int(found[1]) >= 4 * Limits().ping_interval, directive


@pytest.mark.timeout(60)
async def test_a_tab_connects_through_the_readme_nginx_block(tmp_path: Path) -> None:
    require_nginx()
    pki = trustme.CA()
    trusted = ssl.create_default_context()
    pki.configure_trust(trusted)
    (listen,) = free_ports(1)
    async with run(settings()) as server:
        conf = nginx_conf(tmp_path, pki, listen, f"127.0.0.1:{server.server.client_ports[0]}")
        with nginx(conf, listen):
            base = f"wss://127.0.0.1:{listen}/ws/"
            async with connect(base, ssl=trusted, open_timeout=TIMEOUT) as ws:
                tab = Browser(ws)
                await tab.subscribe("PHID-USER-1")
                await server.post({"key": "1", "subscribers": ["PHID-USER-1"]})
                assert (await tab.recv())["key"] == "1"

            # Several Phorge instances on one server: /ws/~acme/ is instance acme.
            async with connect(base + "~acme/?instance=acme", ssl=trusted) as ws:
                tab = Browser(ws)
                await tab.subscribe("PHID-USER-1")
                await server.post({"key": "2", "subscribers": ["PHID-USER-1"]}, instance="acme")
                assert (await tab.recv())["key"] == "2"

            # Phorge's check of a client server: a plain GET must get 501, through nginx.
            async with server.session.get(base, ssl=trusted) as resp:
                assert resp.status == 501
                assert await resp.text() == "HTTP/501 Use Websockets\n"


@pytest.mark.timeout(90)
async def test_tabs_reach_a_cluster_through_the_readme_upstream(tmp_path: Path) -> None:
    require_nginx()
    pki = trustme.CA()
    trusted = ssl.create_default_context()
    pki.configure_trust(trusted)
    (listen,) = free_ports(1)
    base = f"wss://127.0.0.1:{listen}/ws/"
    with RedisServer(tmp_path / "redis") as redis:
        nodes = [spawn(tmp_path / f"node{n}.log", f"--broker={redis.url}") for n in (1, 2)]
        try:
            upstream = labelled("nginx upstream").text
            for address, node in zip(("10.0.0.11:22280", "10.0.0.12:22280"), nodes, strict=True):
                node.wait_ready()
                upstream = replace_once(upstream, address, f"127.0.0.1:{node.client_port}")
            conf = nginx_conf(tmp_path, pki, listen, "fastaphlict", upstream)
            async with aiohttp.ClientSession() as session:
                await until_up(session, *nodes)  # a post then reaches the other node's tabs
                with nginx(conf, listen):
                    async with connect(base, ssl=trusted) as one, connect(base, ssl=trusted) as two:
                        tabs = [Browser(one), Browser(two)]
                        for tab in tabs:
                            await tab.subscribe("PHID-USER-1")
                        active = [(await status(session, n))["clients.active"] for n in nodes]
                        assert active == [1, 1], "nginx balances the tabs over both nodes"
                        await post(
                            session,
                            nodes[0].admin_url,
                            {"key": "1", "subscribers": ["PHID-USER-1"]},
                        )
                        assert [(await tab.recv())["key"] for tab in tabs] == ["1", "1"]

                    # Round robin sends one of two new tabs to the stopped node first.
                    stop(nodes[0])
                    async with connect(base, ssl=trusted) as one, connect(base, ssl=trusted) as two:
                        tabs = [Browser(one), Browser(two)]
                        for tab in tabs:
                            await tab.subscribe("PHID-USER-1")
                        message = {"key": "2", "subscribers": ["PHID-USER-1"]}
                        await post(session, nodes[1].admin_url, message)
                        assert [(await tab.recv())["key"] for tab in tabs] == ["2", "2"]
        finally:
            stop(*nodes)


async def status(session: aiohttp.ClientSession, node: ServerProcess) -> dict[str, int]:
    async with session.get(f"{node.admin_url}/status/") as resp:
        return await resp.json()
