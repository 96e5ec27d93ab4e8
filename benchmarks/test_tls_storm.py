"""A reconnect storm over TLS: the client port serves wss:// itself (``ssl.key``/``ssl.cert``).

Installs without a proxy in front run Aphlict so; every reconnecting tab then
costs the server a TLS handshake on top of the WebSocket one. The certificate
is made here by trustme, once per key type (RSA-2048 and ECDSA P-256), and the
bench trusts its CA (``--ca-file``). The watcher tab's worst ping and the CPU
per tab are printed (see docs/benchmarks.md), not asserted; the replays are
checked exactly. Node Aphlict runs the same storm on the same certificates
where ``FASTAPHLICT_NODE_APHLICT`` names it (the ``node`` rows; skipped
otherwise), one fresh process per run as fastaphlict gets.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

import support
from fastaphlict.bench import Options, Result, raise_nofile_limit, run

QUICK = os.environ.get("FASTAPHLICT_BENCH_QUICK", "").lower() not in ("", "0", "false", "no")

pytestmark = pytest.mark.timeout(300)

#: Tabs reconnecting at once and the history they replay (the issue's 2000 tabs).
TLS_STORM_TABS = 50 if QUICK else 2_000
TLS_STORM_HISTORY = 20 if QUICK else 1_000


@pytest.fixture(params=["fastaphlict", "node"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["rsa", "ecdsa"])
def tls_server(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> Iterator[tuple[str, str, Any]]:
    """A fresh server whose client port speaks TLS with a ``request.param`` key; its CA file."""
    key_type = trustme.KeyType.RSA if request.param == "rsa" else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert("127.0.0.1", key_type=key_type)
    key, cert, ca_file = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(ca_file))
    raise_nofile_limit()
    tls = {"ssl.key": str(key), "ssl.cert": str(cert)}
    if kind == "node":
        ports = support.free_ports(2)
        server = support.spawn_node_aphlict(tmp_path / "server.log", ports, client_options=tls)
    else:
        server = support.spawn(tmp_path / "server.log", config={}, client_options=tls)
    try:
        if kind == "node":
            _wait_listening(server)
        else:
            server.wait_ready()
        yield request.param, str(ca_file), server
    finally:
        server.stop(support.scaled(15))


def _wait_listening(server: Any) -> None:
    """Until both ports accept (Node Aphlict has no /healthz); the process must stay up."""
    deadline = time.monotonic() + support.scaled(20)
    for port in (server.client_port, server.admin_port):
        while True:
            assert server.proc.poll() is None, server.log()
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"port {port} not listening:\n{server.log()}"
                time.sleep(0.05)


def test_tls_storm(
    benchmark: Any, tls_server: tuple[str, str, Any], kind: str, record: Any
) -> None:
    """Every tab reconnects over wss:// at once with subscribe, replay and ping."""
    key_type, ca_file, server = tls_server
    opts = Options(
        client_url=f"wss://127.0.0.1:{server.client_port}/",
        admin_url=f"{server.admin_url}/",
        server_pid=server.pid,
        scenario="storm",
        sockets=TLS_STORM_TABS,
        history=TLS_STORM_HISTORY,
        ca_file=ca_file,
    )
    results: list[Result] = []
    benchmark.pedantic(lambda: results.append(run(opts)), rounds=1, iterations=1)
    (result,) = results
    row = {
        "name": f"storm-tls-{key_type}" + ("-node" if kind == "node" else ""),
        **result.as_dict(),
        "server_log_problems": support.log_problems(server)[:5] if kind != "node" else [],
    }
    benchmark.extra_info.update(row)
    record(row)
    assert result.post_errors == 0, result.first_post_error
    assert result.loss == 0 and result.duplicates == 0 and result.unexpected == 0
    assert result.replay_tabs_wrong == 0 and result.out_of_order == 0
    assert result.replay_frames_received == result.replay_frames_expected
