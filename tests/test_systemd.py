"""systemd integration (issue 10): socket activation and sd_notify.

The tests play systemd: they bind the listening sockets themselves, hand them
to ``python -m fastaphlict`` as descriptors 3, 4, ... with ``LISTEN_PID`` set
to the child's own pid (a shell sets it to ``$$`` and execs into Python, so
the pid is the server's), and read ``NOTIFY_SOCKET`` datagrams on a unix
socket of their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from websockets.asyncio.client import connect

from fastaphlict import systemd
from fastaphlict.config import ServerConfig
from support import (
    PHORGE_CONTENT_TYPE,
    SHUTDOWN,
    STARTUP,
    TIMEOUT,
    Browser,
    ServerProcess,
    activated,
    eventually,
    listening,
    post,
    scaled,
    spawn,
    wait_healthy,
)

# --- the pure parts -----------------------------------------------------------


def test_listen_env_for_this_pid_names_fds_from_3() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "client:admin"}
    assert systemd.parse_listen_env(env, 42) == [(3, "client"), (4, "admin")]


def test_listen_env_for_another_pid_is_not_ours() -> None:
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "2"}
    assert systemd.parse_listen_env(env, 42) == []
    assert systemd.parse_listen_env({"LISTEN_FDS": "2"}, 42) == []


def test_names_that_do_not_line_up_are_dropped() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "client"}
    assert systemd.parse_listen_env(env, 42) == [(3, "unknown"), (4, "unknown")]


def test_a_bad_count_is_an_error() -> None:
    with pytest.raises(systemd.ActivationError, match="LISTEN_FDS"):
        systemd.parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "two"}, 42)


def test_the_variables_are_cleared_once_read() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert systemd.inherited_sockets(env, pid=42) == []
    assert env == {"OTHER": "kept"}


SERVERS = (
    ServerConfig("client", 22280, "0.0.0.0"),
    ServerConfig("admin", 22281, "127.0.0.1"),
)


def test_sockets_match_servers_by_port_not_by_address() -> None:
    admin = systemd.Inherited(3, "admin", "::", 22281)
    client = systemd.Inherited(4, "client", "127.0.0.2", 22280)
    assert systemd.match(SERVERS, [admin, client]) == {0: client, 1: admin}
    assert systemd.match(SERVERS, [admin]) == {1: admin}  # the client binds itself


def test_an_unmatched_socket_is_an_error_naming_it() -> None:
    stray = systemd.Inherited(5, "extra", "::1", 8080)
    with pytest.raises(systemd.ActivationError) as caught:
        systemd.match(SERVERS, [stray])
    assert "fd 5 (extra) on [::1]:8080 matches no configured server" in str(caught.value)


def test_two_sockets_for_one_server_is_an_error() -> None:
    twice = [systemd.Inherited(3, "a", "0.0.0.0", 22280), systemd.Inherited(4, "b", "::", 22280)]
    with pytest.raises(systemd.ActivationError, match="fd 4"):
        systemd.match(SERVERS, twice)


def test_notify_without_notify_socket_sends_nothing() -> None:
    assert systemd.notify("READY=1", {}) is False


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"fastaphlict-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


# --- real processes -----------------------------------------------------------


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Both listening sockets, held by the test as systemd holds them."""
    sockets = [listening(), listening()]
    yield sockets
    for sock in sockets:
        sock.close()


async def test_a_post_reaches_a_tab_on_the_inherited_client_socket(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    # systemd chose the address: the config's listen is only compared, for the log.
    config = {"listen": "0.0.0.0"}
    server = activated(tmp_path / "server.log", held, names="client:admin", config=config)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(server, session)
            async with connect(f"{server.client_url}/~acme/") as ws:
                browser = Browser(ws)
                await browser.subscribe("PHID-1")
                message = {"subscribers": ["PHID-1"], "k": 1}
                resp = await post(session, server.admin_url, message, instance="acme")
                assert resp.status == 200
                assert (await browser.recv())["k"] == 1
    finally:
        server.stop()
    log = server.log()
    assert "client server uses inherited socket fd 3 (client)" in log
    assert "admin server uses inherited socket fd 4 (admin)" in log
    assert "listen address 0.0.0.0 does not apply to inherited socket fd 3" in log


async def test_connections_wait_in_the_backlog_across_a_restart(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    """Stopping closes only the server's copy: a post sent meanwhile is served by the next one."""
    server = activated(tmp_path / "server.log", held)
    async with aiohttp.ClientSession() as session:
        await wait_healthy(server, session)
        server.stop()
        assert server.proc.returncode == 0, server.log()
        # Nobody accepts now, yet the kernel queues the post on systemd's copy.
        pending = asyncio.ensure_future(
            post(session, server.admin_url, {"subscribers": ["PHID-1"]})
        )
        await asyncio.sleep(scaled(0.3))
        assert not pending.done(), "refused or answered while no server ran"
        successor = activated(tmp_path / "successor.log", held)
        try:
            assert (await asyncio.wait_for(pending, STARTUP)).status == 200
        finally:
            successor.stop()


async def test_tls_applies_to_an_inherited_socket(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    tls = {"ssl.key": str(key), "ssl.cert": str(cert)}
    server = activated(tmp_path / "server.log", held, config=tls)
    try:
        connector = aiohttp.TCPConnector(ssl=trusted)
        async with aiohttp.ClientSession(connector=connector) as session:
            admin_url = f"https://127.0.0.1:{server.admin_port}"
            await _until_ok(session, f"{admin_url}/healthz", server)
            url = f"wss://127.0.0.1:{server.client_port}/~acme/"
            async with connect(url, ssl=trusted) as ws:
                browser = Browser(ws)
                await browser.subscribe("PHID-1")
                async with session.post(
                    f"{admin_url}/?instance=acme",
                    data=b'{"subscribers":["PHID-1"],"k":2}',
                    headers={"Content-Type": PHORGE_CONTENT_TYPE},
                ) as resp:
                    assert resp.status == 200
                assert (await browser.recv())["k"] == 2
    finally:
        server.stop()
    assert "client server uses inherited socket fd 3" in server.log()


async def _until_ok(session: aiohttp.ClientSession, url: str, server: ServerProcess) -> None:
    async def ok() -> bool:
        assert server.proc.poll() is None, server.log()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=scaled(1))) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    await eventually(ok, STARTUP, f"{url} answers 200", every=0.05)


def test_an_unmatched_inherited_socket_is_a_one_line_error(
    tmp_path: Path, held: list[socket.socket]
) -> None:
    stray = listening()
    port = stray.getsockname()[1]
    try:
        server = activated(tmp_path / "server.log", [*held, stray], names="client:admin:stray")
        assert server.proc.wait(SHUTDOWN) == 1
    finally:
        stray.close()
    errors = [line for line in server.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1, server.log()
    assert f"inherited socket fd 5 (stray) on 127.0.0.1:{port} matches no" in errors[0]


# --- sd_notify ----------------------------------------------------------------


async def test_ready_only_once_the_ports_accept_and_stopping_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.setblocking(False)
        loop = asyncio.get_running_loop()
        server = spawn(tmp_path / "server.log", env={"NOTIFY_SOCKET": str(path)})
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notify, 4096), STARTUP)
            # No retry: at READY=1 both ports must accept already.
            for port in (server.client_port, server.admin_port):
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            lines = ready.decode().split("\n")
            assert lines[0] == "READY=1"
            assert lines[1] == (
                f"STATUS=serving clients on port(s) {server.client_port},"
                f" admin on {server.admin_port}"
            )
            server.proc.send_signal(signal.SIGTERM)
            stopping = await asyncio.wait_for(loop.sock_recv(notify, 4096), SHUTDOWN)
            assert stopping.decode().split("\n")[0] == "STOPPING=1"
            assert server.proc.wait(SHUTDOWN) == 0
        finally:
            server.stop()
