"""TLS (issue: production operations): wss:// clients, an https admin post, an https relay.

Certificates are made at test time by trustme: a root CA, an intermediate and
a leaf for 127.0.0.1, so the ``ssl.chain`` handling is exercised too (the
client trusts only the root and needs the intermediate from the server).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from websockets.asyncio.client import connect

from fastaphlict.config import Config, ConfigError, PeerConfig, ServerConfig
from fastaphlict.config.tls import server_context
from support import (
    PHORGE_CONTENT_TYPE,
    TIMEOUT,
    Browser,
    client_frame,
    eventually,
    run,
    settings,
    upgrade_request,
    wss_storm,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("pki")
    paths = {
        "key": d / "key.pem",
        "cert": d / "cert.pem",
        "chain": d / "chain.pem",
        "ca": d / "ca.pem",
    }
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    intermediate.cert_pem.write_to_path(str(paths["chain"]))
    root.cert_pem.write_to_path(str(paths["ca"]))
    client = ssl.create_default_context(cafile=str(paths["ca"]))
    return {"paths": {k: str(v) for k, v in paths.items()}, "client": client}


def tls_config(pki: dict, peers: tuple[PeerConfig, ...] = ()) -> Config:  # type: ignore[type-arg]
    p = pki["paths"]
    tls = {"ssl_key": p["key"], "ssl_cert": p["cert"], "ssl_chain": p["chain"]}
    return Config(
        servers=(
            ServerConfig("client", 0, "127.0.0.1", **tls),
            ServerConfig("admin", 0, "127.0.0.1", **tls),
        ),
        cluster=peers,
    )


async def test_wss_session_and_https_admin_post(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(settings(config=tls_config(pki))) as srv:
        client_port, admin_port = srv.server.client_ports[0], srv.server.admin_ports[0]
        async with connect(f"wss://127.0.0.1:{client_port}/~acme/", ssl=pki["client"]) as ws:
            browser = Browser(ws)
            await browser.subscribe("PHID-1")
            connector = aiohttp.TCPConnector(ssl=pki["client"])
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.post(
                    f"https://127.0.0.1:{admin_port}/?instance=acme",
                    data='{"subscribers":["PHID-1"],"t":"über"}'.encode(),
                    headers={"Content-Type": PHORGE_CONTENT_TYPE},
                ) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["fingerprint"] == srv.hub.fingerprint
                async with session.get(f"https://127.0.0.1:{admin_port}/status/") as resp:
                    assert resp.status == 200  # the aiohttp side over TLS too
            got = await browser.recv()
            assert got["t"] == "über"


async def test_plain_http_to_a_tls_port_gets_nothing_in_clear(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(settings(config=tls_config(pki))) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.admin_ports[0])
        writer.write(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        assert b"fingerprint" not in data
        assert srv.hub.stats.messages_in == 0


async def test_relay_to_an_https_peer_verifies_with_the_given_ca(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(settings(config=tls_config(pki))) as b:
        peer = PeerConfig("127.0.0.1", b.server.admin_ports[0], "https")
        config = Config(
            servers=(ServerConfig("client", 0, "127.0.0.1"), ServerConfig("admin", 0, "127.0.0.1")),
            cluster=(peer,),
        )
        async with run(settings(config=config, peer_ca_file=pki["paths"]["ca"])) as node:
            a = node.server
            async with connect(
                f"wss://127.0.0.1:{b.server.client_ports[0]}/", ssl=pki["client"]
            ) as ws:
                browser = Browser(ws)
                await browser.subscribe("PHID-1")
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        f"http://127.0.0.1:{a.admin_ports[0]}/",
                        data=json.dumps({"subscribers": ["PHID-1"], "n": 1}).encode(),
                        headers={"Content-Type": PHORGE_CONTENT_TYPE},
                    ) as resp:
                        assert resp.status == 200
                got = await browser.recv()
                assert got["n"] == 1
                assert got["touched"] == [a.fingerprint, b.hub.fingerprint]
            assert a.relay.peers[0].fingerprint == b.hub.fingerprint


async def test_relay_refuses_an_unverifiable_https_peer(pki: dict) -> None:  # type: ignore[type-arg]
    async with run(settings(config=tls_config(pki))) as b:
        peer = PeerConfig("127.0.0.1", b.server.admin_ports[0], "https")
        async with run(
            settings(
                config=Config(
                    servers=(
                        ServerConfig("client", 0, "127.0.0.1"),
                        ServerConfig("admin", 0, "127.0.0.1"),
                    ),
                    cluster=(peer,),
                )
            )
        ) as a:  # no CA given: the system store doesn't know our throwaway root
            assert (await a.post({"subscribers": []})).status == 200
            await eventually(lambda: a.server.relay.peers[0].failed, TIMEOUT, "the relay failed")
            assert a.server.relay.peers[0].failed == 1
            assert a.server.relay.peers[0].fingerprint is None
            assert b.hub.stats.messages_in == 0


def test_mismatched_key_and_certificate_fail_with_the_entry_named(
    pki: dict,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    entry = ServerConfig("client", 22280, "0.0.0.0", str(wrong_key), pki["paths"]["cert"])
    with pytest.raises(ConfigError, match=r'index "1", on port "22280"'):
        server_context(entry, 1)


def _tls_config(path: Path, key: str, cert: str) -> Path:
    """An Aphlict config at ``path``: a TLS client port 22280 on ``key``/``cert``, an admin."""
    servers = [
        {"type": "client", "port": 22280, "ssl.key": key, "ssl.cert": cert},
        {"type": "admin", "port": 22281, "listen": "127.0.0.1"},
    ]
    path.write_text(json.dumps({"servers": servers}))
    return path


def test_config_test_loads_the_tls_files(
    pki: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fastaphlict import cli

    p = pki["paths"]
    good = _tls_config(tmp_path / "good.json", p["key"], p["cert"])
    assert cli.main([f"--config={good}", "--test", f"--peer-ca-file={p['ca']}"]) == 0
    assert "Configuration test OK." in capsys.readouterr().out

    bad = _tls_config(tmp_path / "bad.json", p["ca"], p["cert"])  # a certificate for the key
    assert cli.main([f"--config={bad}", "--test"]) == 1
    assert 'index "0", on port "22280"' in capsys.readouterr().err


def test_a_bad_tls_key_fails_the_start_as_it_fails_the_test(
    pki: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One preflight: start refuses a key --test refuses, in the same line, before serving."""
    from fastaphlict import cli

    p = pki["paths"]
    bad = _tls_config(tmp_path / "bad.json", p["ca"], p["cert"])  # a certificate for the key
    assert cli.main([f"--config={bad}", "--test"]) == 1
    tested = capsys.readouterr().err
    assert cli.main([f"--config={bad}"]) == 1
    started = capsys.readouterr().err
    assert started == tested
    assert started.startswith('fastaphlict: Server (at index "0", on port "22280") has a TLS key')
    assert started.count("\n") == 1


def test_a_bad_peer_ca_file_fails_the_start_as_it_fails_the_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastaphlict import cli

    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    assert cli.main(["--test", f"--peer-ca-file={ca}"], environ={}) == 1
    tested = capsys.readouterr().err
    assert cli.main([f"--peer-ca-file={ca}"], environ={}) == 1
    assert capsys.readouterr().err == tested
    assert tested.startswith(f'fastaphlict: Peer CA file "{ca}" can not be loaded')


def _https_post(port: int, context: ssl.SSLContext, body: bytes) -> int | str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": PHORGE_CONTENT_TYPE})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def test_an_oversized_https_post_still_sending_its_body_reads_the_413(pki: dict) -> None:  # type: ignore[type-arg]
    """The lingering close over TLS, which can't half-close: it must not try to."""
    async with run(settings(config=tls_config(pki))) as srv:
        port, body = srv.server.admin_ports[0], b"x" * (3 * 1024 * 1024)
        answers = [
            await asyncio.to_thread(_https_post, port, pki["client"], body) for _ in range(20)
        ]
        assert answers == [413] * 20


async def test_the_bench_storm_runs_over_wss_trusting_the_given_ca(pki: dict) -> None:  # type: ignore[type-arg]
    """``fastaphlict-bench --ca-file``: a storm on a TLS client port replays exactly."""
    p = pki["paths"]
    tls = {"ssl_key": p["key"], "ssl_cert": p["cert"], "ssl_chain": p["chain"]}
    config = Config(
        servers=(
            ServerConfig("client", 0, "127.0.0.1", **tls),
            ServerConfig("admin", 0, "127.0.0.1"),
        )
    )
    async with run(settings(config=config)) as srv:
        result = await wss_storm(srv, p["ca"], sockets=20, connect_concurrency=10)
    assert result.watcher_pings > 0
    assert result.replay_frames_expected > 0
    assert result.replay_frames_received == result.replay_frames_expected
    assert result.replay_tabs_wrong == result.loss == result.duplicates == 0


async def _wss_upgraded(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(upgrade_request("/"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _server_payload(reader: asyncio.StreamReader) -> bytes:
    _, b1 = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    return await asyncio.wait_for(reader.readexactly(size), TIMEOUT)


async def test_large_frames_over_tls_arrive_whole_beside_other_sockets(pki: dict) -> None:  # type: ignore[type-arg]
    """TLS records decrypt into the idle sockets' shared buffer, more than it holds at once.

    uvloop's TLS layer fills the buffer it is given and reads the rest on a
    later pass; what is left of a frame must move out before another socket
    reads, here a ping between every 5000 bytes.
    """
    ping = client_frame(b'{"command":"ping","data":null}')
    pong = b'{"type":"pong"}'
    async with run(settings(config=tls_config(pki))) as srv:
        port = srv.server.client_ports[0]
        tabs = [await _wss_upgraded(port, pki["client"]) for _ in range(3)]  # type: ignore[arg-type]
        other_reader, other_writer = await _wss_upgraded(port, pki["client"])  # type: ignore[arg-type]
        for i, (_, writer) in enumerate(tabs):
            phids = ",".join(f'"PHID-TLS-{i}-{j:08d}"' for j in range(2000)).encode()
            frame = client_frame(b'{"command":"subscribe","data":[' + phids + b"]}") + ping
            for start in range(0, len(frame), 5000):
                writer.write(frame[start : start + 5000])
                await writer.drain()
                other_writer.write(ping)
                assert await _server_payload(other_reader) == pong
        for reader, _ in tabs:
            assert await _server_payload(reader) == pong
        async with aiohttp.ClientSession() as session:
            for i in range(len(tabs)):
                response = await session.post(
                    f"https://127.0.0.1:{srv.server.admin_ports[0]}/",
                    json={
                        "key": i,
                        "type": "notification",
                        "subscribers": [f"PHID-TLS-{i}-00001999"],
                    },
                    ssl=pki["client"],
                )
                assert response.status == 200
        for i, (reader, _) in enumerate(tabs):
            assert b'"key":%d,' % i in await _server_payload(reader)
        for _, writer in [*tabs, (other_reader, other_writer)]:
            writer.close()
