"""The paced TLS accept path (paced.py): a budget of handshakes per loop pass on a TLS client port.

Certificates come from trustme, as in test_tls.py. Real sockets throughout;
the budget is counted per accept callback (``PacedServer.accepted``), which
is one call per loop pass in which the listening socket was readable.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fastaphlict import paced
from fastaphlict.config import Config, ServerConfig
from fastaphlict.server import Limits
from support import TIMEOUT, Browser, eventually, listening, run, scaled, settings, upgrade_request

BUDGET = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    d = tmp_path_factory.mktemp("pki")
    key, cert, ca_file = d / "key.pem", d / "cert.pem", d / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    return {
        "key": str(key),
        "cert": str(cert),
        "ca": str(ca_file),
        "client": client,
        "server": server,
    }


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> int:
    """A small budget, so that a few dozen sockets take several passes."""
    monkeypatch.setattr(paced, "ACCEPT_BUDGET", BUDGET)
    return BUDGET


def tls_client_config(pki: dict) -> Config:  # type: ignore[type-arg]
    return Config(
        servers=(
            ServerConfig("client", 0, "127.0.0.1", ssl_key=pki["key"], ssl_cert=pki["cert"]),
            ServerConfig("admin", 0, "127.0.0.1"),
        )
    )


def paced_server(srv: object) -> paced.PacedServer:
    (server,) = srv.server.listeners.client_servers  # type: ignore[attr-defined]
    assert isinstance(server, paced.PacedServer), "a TLS client port is served paced"
    return server


def hello_started(port: int) -> socket.socket:
    """A connection that sent the first bytes of a TLS record and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    sock.sendall(b"\x16\x03\x01")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
async def test_each_pass_accepts_at_most_the_budget(pki: dict, budget: int) -> None:  # type: ignore[type-arg]
    """Twenty sockets queued at once are taken four a pass, not all in one.

    The listener stops watching its socket while the twenty connect and send
    their first bytes, until the kernel holds all of them in the backlog; then
    it watches again: without the budget its first callback takes them all.
    """
    async with run(settings(config=tls_client_config(pki))) as srv:
        server = paced_server(srv)
        server.accepted = []
        port = srv.server.client_ports[0]
        server._stop()
        socks = [hello_started(port) for _ in range(5 * budget)]
        try:
            await eventually(lambda: backlog(port) == 5 * budget, what="all twenty queued")
            assert server.accepted == []
            server._start()
            await eventually(lambda: sum(server.accepted or ()) == 5 * budget)
            assert server.accepted == [budget] * 5
        finally:
            for sock in socks:
                sock.close()


def backlog(port: int) -> int:
    """Connections waiting in the accept queue of the loopback listener on ``port`` (Linux)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    return 0


@pytest.mark.skipif(paced.DEFER_ACCEPT is None, reason="TCP_DEFER_ACCEPT is Linux's")
async def test_a_connection_that_sent_nothing_yet_is_not_accepted(pki: dict, budget: int) -> None:  # type: ignore[type-arg]
    """Only a socket with its hello in is taken: a budget spent on silent sockets would
    leave the handshakes that are ready for later passes, and let them pile up.

    The silent sockets connect first; the tab after them is accepted alone (the
    kernel holds the silent ones for the handshake timeout, 5 s here).
    """
    async with run(settings(config=tls_client_config(pki))) as srv:
        server = paced_server(srv)
        server.accepted = []
        port = srv.server.client_ports[0]
        silent = [socket.create_connection(("127.0.0.1", port), TIMEOUT) for _ in range(budget)]
        try:
            url = f"wss://127.0.0.1:{port}/"
            async with connect(url, ssl=pki["client"], open_timeout=TIMEOUT) as ws:
                await Browser(ws).sync()
                assert sum(server.accepted) == 1
        finally:
            for sock in silent:
                sock.close()


async def test_a_storm_of_tls_handshakes_all_get_their_replay(pki: dict, budget: int) -> None:  # type: ignore[type-arg]
    """200 tabs connect at once over wss:// through a budget of 4: every replay exact."""
    from fastaphlict.bench.model import Options
    from fastaphlict.bench.storm import run_storm

    async with run(settings(config=tls_client_config(pki))) as srv:
        server = paced_server(srv)
        server.accepted = []
        opts = Options(
            client_url=f"wss://127.0.0.1:{srv.server.client_ports[0]}/",
            admin_url=f"http://127.0.0.1:{srv.server.admin_ports[0]}/",
            scenario="storm",
            sockets=200,
            history=10,
            phids_per_tab=3,
            connect_concurrency=200,
            ca_file=pki["ca"],
        )
        result = await run_storm(opts)
    assert result.replay_frames_expected > 0
    assert result.replay_frames_received == result.replay_frames_expected
    assert result.replay_tabs_wrong == result.loss == result.duplicates == 0
    assert sum(server.accepted) >= 200
    assert max(server.accepted) <= budget


async def test_silent_and_stalled_hellos_are_dropped_and_hold_no_budget(
    pki: dict,  # type: ignore[type-arg]
    budget: int,
) -> None:
    """Sockets that never finish (or never start) a ClientHello: a tab is served meanwhile,
    and the handshake timeout closes them."""
    limits = Limits(handshake_timeout=scaled(0.3))
    async with run(settings(config=tls_client_config(pki), limits=limits)) as srv:
        port = srv.server.client_ports[0]
        stalled = [hello_started(port) for _ in range(2 * budget)]
        silent = [socket.create_connection(("127.0.0.1", port), TIMEOUT) for _ in range(budget)]
        try:
            for sock in stalled + silent:
                sock.setblocking(False)
            url = f"wss://127.0.0.1:{port}/"
            async with connect(url, ssl=pki["client"], open_timeout=TIMEOUT) as ws:
                browser = Browser(ws)
                await browser.subscribe("PHID-1")
                assert (await srv.post({"subscribers": ["PHID-1"], "n": 1})).status == 200
                assert (await browser.recv())["n"] == 1
                # Kept waiting past the defer period, the silent ones are accepted
                # too, and dropped once the handshake timeout passes.
                await eventually(
                    lambda: all(map(closed_by_server, stalled + silent)),
                    TIMEOUT + scaled(3),
                    "the server closed every unfinished handshake",
                )
                await browser.sync()  # the tab is still served
        finally:
            for sock in stalled + silent:
                sock.close()


async def test_the_connection_cap_refuses_a_tls_tab_past_it(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(
        settings(config=tls_client_config(pki), limits=Limits(max_connections=1))
    ) as srv:
        url = f"wss://127.0.0.1:{srv.server.client_ports[0]}/"
        async with connect(url, ssl=pki["client"], open_timeout=TIMEOUT) as ws:
            await Browser(ws).sync()
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, ssl=pki["client"], open_timeout=TIMEOUT):
                    pass
            assert refused.value.response.status_code == 503


async def test_close_stops_accepting_and_says_going_away(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(settings(config=tls_client_config(pki))) as srv:
        server = paced_server(srv)
        port = srv.server.client_ports[0]
        url = f"wss://127.0.0.1:{port}/"
        async with connect(url, ssl=pki["client"], open_timeout=TIMEOUT) as ws:
            await Browser(ws).sync()
            await srv.server.close()
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert ws.close_code == 1001
        assert not server.is_serving() and server.sockets == ()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), TIMEOUT).close()


class _Held(asyncio.Protocol):
    """A server side that keeps its connection until told otherwise."""

    transports: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)


async def test_wait_closed_waits_for_the_accepted_connections(pki: dict) -> None:  # type: ignore[type-arg]
    """As uvloop's server does: close() leaves connections open, wait_closed() outlasts them."""
    _Held.transports = []
    server = await paced.serve(_Held, pki["server"], host="127.0.0.1")
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki["client"])
    try:
        await eventually(lambda: len(_Held.transports) == 1)
        server.close()
        waiting = asyncio.ensure_future(server.wait_closed())
        await writer.drain()  # a round of the loop, then more: still open
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done(), "wait_closed returned while a connection was open"
        _Held.transports[0].close()
        await asyncio.wait_for(waiting, TIMEOUT)
    finally:
        writer.close()


def _upgrade(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    """A wss:// upgrade by hand, read up to the 101 (the tickets arrive with it)."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), TIMEOUT),
        server_hostname="127.0.0.1",
        session=session,
    )
    sock.sendall(upgrade_request("/"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_tab_that_reconnects_resumes_its_tls_session(pki: dict) -> None:  # type: ignore[type-arg]
    """Browsers resume with the session ticket of their last connection: one context
    for every socket of the port keeps the ticket valid (RSA-2048 here: 933 us a
    full handshake and upgrade, 633 us resumed, docs/benchmarks.md)."""
    async with run(settings(config=tls_client_config(pki))) as srv:
        port = srv.server.client_ports[0]
        first = await asyncio.to_thread(_upgrade, port, pki["client"], None)
        session = first.session
        first.close()
        assert session is not None and session.has_ticket
        again = await asyncio.to_thread(_upgrade, port, pki["client"], session)
        try:
            assert again.session_reused
        finally:
            again.close()


async def test_a_tls_client_port_in_use_fails_the_start_naming_the_entry(pki: dict) -> None:  # type: ignore[type-arg]
    with listening() as taken:
        port = taken.getsockname()[1]
        config = Config(
            servers=(
                ServerConfig("client", port, "127.0.0.1", ssl_key=pki["key"], ssl_cert=pki["cert"]),
                ServerConfig("admin", 0, "127.0.0.1"),
            )
        )
        with pytest.raises(
            OSError,
            match=rf'client server \(at index "0"\) cannot listen on 127.0.0.1:{port}: Address',
        ):
            async with run(settings(config=config)):
                pass


async def test_reuse_port_lets_two_paced_listeners_share_a_port(pki: dict) -> None:  # type: ignore[type-arg]
    """--reuse-port (several processes behind one port) on the paced path as on uvloop's."""
    first = await paced.bind("127.0.0.1", 0, reuse_address=True, reuse_port=True, backlog=8)
    port = first[0].getsockname()[1]
    try:
        second = await paced.bind("127.0.0.1", port, reuse_address=True, reuse_port=True, backlog=8)
        for sock in second:
            sock.close()
        with pytest.raises(OSError):
            await paced.bind("127.0.0.1", port, reuse_address=True, reuse_port=False, backlog=8)
    finally:
        for sock in first:
            sock.close()
