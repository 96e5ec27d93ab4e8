"""``fastaphlict doctor`` run as the real command against real set-ups, each broken on purpose.

Every failure the doctor must diagnose is built here for real: Debian's
nginx without the Upgrade headers, or with a 1 s ``proxy_read_timeout``; a
path nginx does not map; a self-signed certificate; a server that refuses
the Origin; an admin port nothing listens on; a node whose Redis is stopped;
a port that accepts and never answers. The doctor runs as ``python -m
fastaphlict doctor`` with a time limit, and each test checks the step that
failed and its sentence. The working set-up (fastaphlict behind the README's
nginx block with TLS, on a broker) passes every step, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from docs_support import INSTALLED, labelled, runnable
from fastaphlict.config import Config, ServerConfig
from fastaphlict.doctor import network
from fastaphlict.doctor.targets import Target
from nginx_support import nginx, nginx_conf, readme_block, replace_once, require_nginx
from redis_support import RedisServer
from support import (
    Running,
    child_env,
    eventually,
    free_ports,
    listening,
    run,
    scaled,
    settings,
    spawn_node_aphlict,
    stop,
)

pytestmark = pytest.mark.timeout(90)

ORIGIN = "https://phorge.example.com"


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def report(self) -> dict[str, Any]:
        return json.loads(self.out)  # type: ignore[no-any-return]

    def failures(self) -> list[dict[str, Any]]:
        return [check for check in self.report["checks"] if check["ok"] is False]

    def failure(self, step: str) -> dict[str, Any]:
        """The one failed check (the chain stopped there), which must be ``step``."""
        (failed,) = self.failures()
        assert failed["step"] == step, failed
        return failed

    def steps(self) -> list[tuple[str, str, bool | None]]:
        return [(c["target"].split()[0], c["step"], c["ok"]) for c in self.report["checks"]]


async def finished(proc: asyncio.subprocess.Process, within: float) -> Outcome:
    """``proc``'s exit and output; it must end within ``within`` (scaled) seconds."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), scaled(within))
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the doctor still ran after {scaled(within):g} s") from None
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


async def doctor(*args: str, within: float = 60) -> Outcome:
    """``python -m fastaphlict doctor ARGS``; it must end within ``within`` (scaled) seconds.

    Each step's own limit (``--timeout``, 5 s) is scaled too, unless the test sets it.
    """
    limit = () if "--timeout" in args else ("--timeout", f"{scaled(5):g}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastaphlict",
        "doctor",
        *args,
        *limit,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return await finished(proc, within)


async def documented(command: str, within: float = 60) -> Outcome:
    """A documented command line, run by ``sh`` from the root of the clone."""
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        command,
        cwd=Path(__file__).resolve().parents[1],
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return await finished(proc, within)


def servers_file(tmp_path: Path, servers: list[dict[str, Any]]) -> str:
    """``notification.servers`` in a file, as ``bin/config get`` would give it."""
    path = tmp_path / "servers.json"
    path.write_text(json.dumps(servers))
    return str(path)


def ca_file(tmp_path: Path, pki: trustme.CA) -> str:
    path = tmp_path / "ca.pem"
    pki.cert_pem.write_to_path(str(path))
    return str(path)


def behind(listen: int, admin: int, path: str = "/ws/") -> list[dict[str, Any]]:
    """The README's behind-nginx ``notification.servers``, on the test's ports."""
    return [
        {"type": "client", "host": "127.0.0.1", "port": listen, "protocol": "https", "path": path},
        {"type": "admin", "host": "127.0.0.1", "port": admin, "protocol": "http"},
    ]


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Running, Running]]:
    """Two in-process nodes of one broker cluster, both in sync with their Redis."""
    with RedisServer(tmp_path / "redis") as redis:
        broker = settings([f"--broker={redis.url}"])
        async with run(broker) as a, run(broker) as b:
            await a.broker_up()
            await b.broker_up()
            yield redis, a, b


def entries(*nodes: Running) -> list[dict[str, Any]]:
    """A client and an admin entry for each node, plain HTTP on loopback."""
    return [
        {"type": kind, "host": "127.0.0.1", "port": port, "protocol": "http"}
        for node in nodes
        for kind, port in (
            ("client", node.server.client_ports[0]),
            ("admin", node.server.admin_ports[0]),
        )
    ]


# -- the working set-up ------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_the_working_setup_behind_nginx_with_tls_passes_every_step(tmp_path: Path) -> None:
    require_nginx()
    pki = trustme.CA()
    (listen,) = free_ports(1)
    with RedisServer(tmp_path / "redis") as redis:
        async with run(settings([f"--broker={redis.url}"])) as node:
            await node.broker_up()
            upstream = f"127.0.0.1:{node.server.client_ports[0]}"
            with nginx(nginx_conf(tmp_path, pki, listen, upstream), listen):
                servers = servers_file(tmp_path, behind(listen, node.server.admin_ports[0]))
                common = ["--servers", servers, "--ca-file", ca_file(tmp_path, pki)]
                done = await doctor(*common, "--origin", ORIGIN, "--idle", "2", "--json")
                assert done.code == 0, done.out + done.err
                assert done.steps() == [
                    ("admin", step, True) for step in ("dns", "tcp", "status", "broker")
                ] + [
                    ("client", step, True)
                    for step in (
                        "dns", "tcp", "tls", "upgrade", "origin", "subscribe", "delivery",
                        "replay", "idle",
                    )
                ]  # fmt: skip
                assert done.report["ok"] is True

                # Text, and an instance: browsers then connect to /ws/~acme/.
                text = await doctor(*common, "--origin", ORIGIN, "--instance", "acme")
                print(text.out)
                assert text.code == 0, text.out + text.err
                lines = text.out.splitlines()
                assert all(line.startswith("✓") for line in lines[:-1]), text.out
                assert f"client wss://127.0.0.1:{listen}/ws/~acme/?instance=acme" in text.out
                assert lines[-1] == "all 12 checks passed"


@pytest.mark.timeout(120)
async def test_every_node_of_a_cluster_reaches_every_client_server(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (_, a, b):
        done = await doctor("--servers", servers_file(tmp_path, entries(a, b)), "--json")
    assert done.code == 0, done.out + done.err
    cluster = [c for c in done.report["checks"] if c["step"] == "cluster"]
    assert [c["ok"] for c in cluster] == [True, True]
    assert all("reached all 2 client servers" in c["figure"] for c in cluster)


# -- the documented commands ------------------------------------------------------


async def test_the_readmes_doctor_command_runs_as_written(tmp_path: Path) -> None:
    """What moves: ``bin/config get`` prints the test's setting, the install path is ours."""
    (command,) = labelled("doctor readme").commands
    assert command.startswith("bin/config get notification.servers | ")
    async with run(settings()) as node:
        value = [
            {"type": "client", "host": "127.0.0.1", "port": node.server.client_ports[0],
             "protocol": "http"},
            {"type": "admin", "host": "127.0.0.1", "port": node.server.admin_ports[0],
             "protocol": "http"},
        ]  # fmt: skip
        # What Phorge's `bin/config get` prints: each source, the local one set.
        printed = tmp_path / "config-get.json"
        printed.write_text(
            json.dumps(
                {
                    "config": [
                        {"key": "notification.servers", "source": "local", "value": value,
                         "status": "set", "errorInfo": None},
                        {"key": "notification.servers", "source": "database", "value": None,
                         "status": "unset", "errorInfo": None},
                    ]
                },
                indent=2,
            )
        )  # fmt: skip
        ours = command.replace("bin/config get notification.servers", f"cat {printed}")
        # The test's client entry is plain http: Phorge's http pages are the ones using it.
        ours = replace_once(ours, "--origin https://", "--origin http://")
        done = await documented(runnable(ours.replace(INSTALLED, ".venv/bin/")))
    assert done.code == 0, done.out + done.err
    assert "✓ client ws://127.0.0.1:" in done.out
    assert done.out.splitlines()[-1] == "all 10 checks passed, 1 skipped"


async def test_the_docs_doctor_command_with_urls_runs_as_written() -> None:
    """What moves: the default ports 22280 and 22281, to the test server's."""
    (command,) = labelled("doctor urls").commands
    async with run(settings()) as node:
        ours = command.replace(":22280/", f":{node.server.client_ports[0]}/")
        ours = ours.replace(":22281/", f":{node.server.admin_ports[0]}/")
        assert ours != command
        done = await documented(runnable(ours))
    assert done.code == 0, done.out + done.err
    assert done.report["ok"] is True
    assert ("client", "idle", True) in done.steps()


# -- the proxy -------------------------------------------------------------------------


async def test_nginx_without_the_upgrade_headers_is_named(tmp_path: Path) -> None:
    require_nginx()
    pki = trustme.CA()
    (listen,) = free_ports(1)
    block = readme_block()
    block = replace_once(block, "proxy_set_header Upgrade $http_upgrade;\n", "")
    block = replace_once(block, "proxy_set_header Connection $connection_upgrade;\n", "")
    async with run(settings()) as node:
        upstream = f"127.0.0.1:{node.server.client_ports[0]}"
        with nginx(nginx_conf(tmp_path, pki, listen, upstream, block=block), listen):
            servers = servers_file(tmp_path, behind(listen, node.server.admin_ports[0]))
            args = ["--servers", servers, "--ca-file", ca_file(tmp_path, pki)]
            done = await doctor(*args, "--json")
            text = await doctor(*args)
    print(text.out)
    assert done.code == 1
    failed = done.failure("upgrade")
    assert "does not forward Upgrade" in failed["cause"]
    assert 'the README\'s "Behind nginx" section' in failed["fix"]
    assert re.search(
        r"^✗ client wss://\S+/ws/ +upgrade: HTTP 501: .*does not forward Upgrade", text.out, re.M
    )
    assert text.code == 1


async def test_a_short_proxy_read_timeout_is_caught_by_the_idle_step(tmp_path: Path) -> None:
    require_nginx()
    pki = trustme.CA()
    (listen,) = free_ports(1)
    block = replace_once(readme_block(), "proxy_read_timeout 600s;", "proxy_read_timeout 1s;")
    async with run(settings()) as node:
        upstream = f"127.0.0.1:{node.server.client_ports[0]}"
        with nginx(nginx_conf(tmp_path, pki, listen, upstream, block=block), listen):
            servers = servers_file(tmp_path, behind(listen, node.server.admin_ports[0]))
            done = await doctor(
                "--servers", servers, "--ca-file", ca_file(tmp_path, pki), "--idle", "3", "--json"
            )
    assert done.code == 1
    failed = done.failure("idle")
    after = re.search(r"cut after ([\d.]+) s without traffic", failed["cause"])
    assert after, failed
    assert 0.8 <= float(after[1]) < 3, failed["cause"]  # nginx's 1 s, not the doctor's 3
    assert "browsers ping every 15 s, so this cuts every tab" in failed["cause"]
    assert "proxy_read_timeout" in failed["cause"] and "proxy_read_timeout" in failed["fix"]


@pytest.mark.parametrize(
    ("phorge", "says"),
    [
        ("return 404;", "HTTP 404: the path /notify/ is not mapped"),
        (
            'default_type text/html; return 200 "<html><body>Phorge</body></html>";',
            "HTTP 200 with HTML: the proxy served a page",
        ),
    ],
)
async def test_a_path_nginx_does_not_map_is_named(tmp_path: Path, phorge: str, says: str) -> None:
    """The client entry names /notify/, nginx maps /ws/: Phorge's own location answers."""
    require_nginx()
    pki = trustme.CA()
    (listen,) = free_ports(1)
    block = replace_once(
        readme_block(), "# ... Phorge's own locations ...", f"location / {{ {phorge} }}"
    )
    async with run(settings()) as node:
        upstream = f"127.0.0.1:{node.server.client_ports[0]}"
        with nginx(nginx_conf(tmp_path, pki, listen, upstream, block=block), listen):
            servers = behind(listen, node.server.admin_ports[0], path="/notify/")
            done = await doctor(
                "--servers",
                servers_file(tmp_path, servers),
                "--ca-file",
                ca_file(tmp_path, pki),
                "--json",
            )
    assert done.code == 1
    failed = done.failure("upgrade")
    assert failed["cause"].startswith(says)


# -- the server's own answers -----------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A key and a certificate for 127.0.0.1 that signs itself (no CA at all)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "self.key", tmp_path / "self.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


async def test_a_self_signed_certificate_fails_tls_unless_given_as_ca_file_and_named(
    tmp_path: Path,
) -> None:
    key, cert = self_signed(tmp_path)
    config = Config(
        servers=(
            ServerConfig("client", 0, "127.0.0.1", ssl_key=key, ssl_cert=cert),
            ServerConfig("admin", 0, "127.0.0.1"),
        )
    )
    async with run(settings(config=config)) as node:
        urls = [
            "--client-url",
            f"wss://127.0.0.1:{node.server.client_ports[0]}/",
            "--admin-url",
            node.admin_url,
        ]
        refused = await doctor(*urls, "--json")
        trusted = await doctor(*urls, "--ca-file", cert, "--json")
        # The same certificate, reached by a name it does not hold.
        port = node.server.client_ports[0]
        misnamed = await doctor(
            "--client-url", f"wss://localhost:{port}/", "--ca-file", cert, "--json"
        )
    assert refused.code == 1
    failed = refused.failure("tls")
    assert "not trusted (self-signed certificate)" in failed["cause"]
    assert "--ca-file" in failed["fix"]
    assert trusted.code == 0, trusted.out
    assert ("client", "tls", True) in trusted.steps()
    assert "the certificate does not name localhost" in misnamed.failure("tls")["cause"]


async def test_a_refused_origin_is_named_with_the_setting_to_change() -> None:
    origin = "http://phorge.example.com"  # the ws:// entry serves Phorge's http pages
    async with run(settings([f"--allowed-origins={origin}"])) as node:
        urls = ["--client-url", node.client_url(), "--admin-url", node.admin_url]
        refused = await doctor(*urls, "--origin", "https://other.example.com", "--json")
        allowed = await doctor(*urls, "--origin", origin, "--json")
    assert refused.code == 1
    failed = refused.failure("origin")
    assert "refuses the Origin https://other.example.com" in failed["cause"]
    assert "--allowed-origins" in failed["fix"]
    assert ("client", "upgrade", True) in refused.steps()
    assert allowed.code == 0, allowed.out


async def test_an_https_origin_needs_an_enabled_https_client_entry() -> None:
    """Phorge's https pages pick only client entries whose protocol is https."""
    async with run(settings()) as node:
        urls = ["--client-url", node.client_url(), "--admin-url", node.admin_url]
        done = await doctor(*urls, "--origin", ORIGIN, "--json")
    assert done.code == 1, done.out
    failed = done.failure("origin")
    assert (
        "Phorge's https pages use only client entries with protocol https; none is enabled"
        in failed["cause"]
    )


async def test_an_admin_port_nothing_listens_on_is_named() -> None:
    (nothing,) = free_ports(1)
    async with run(settings()) as node:
        done = await doctor(
            "--client-url",
            node.client_url(),
            "--admin-url",
            f"http://127.0.0.1:{nothing}/",
            "--json",
        )
    assert done.code == 1
    failed = done.failure("tcp")
    assert failed["target"] == f"admin http://127.0.0.1:{nothing}/"
    assert f"nothing listens on 127.0.0.1:{nothing} (connection refused)" in failed["cause"]
    assert "Phorge posts here" in failed["fix"]
    # The client server is still checked; only the delivery needs an admin.
    assert ("client", "subscribe", True) in done.steps()
    assert ("client", "delivery", None) in done.steps()


@pytest.mark.timeout(120)
async def test_a_node_whose_redis_is_stopped_is_not_on_its_broker(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (redis, a, b):
        redis.stop()
        for node in (a, b):
            assert node.server.broker is not None
            await eventually(lambda n=node: not n.server.broker.up, scaled(20), "down")
        done = await doctor("--servers", servers_file(tmp_path, entries(a, b)), "--json")
    assert done.code == 1
    broker_lines = [c for c in done.report["checks"] if c["step"] == "broker"]
    assert [c["ok"] for c in broker_lines] == [False, False]
    assert all("this node is not on its broker" in c["cause"] for c in broker_lines)
    # Each node still delivers to its own tabs: only the cluster is broken.
    assert [c["ok"] for c in done.report["checks"] if c["step"] == "delivery"] == [True, False]
    assert all(
        "not one cluster" in c["cause"]
        for c in done.report["checks"]
        if c["step"] == "cluster" and c["ok"] is False
    )


# -- the doctor never hangs ----------------------------------------------------------


async def test_ports_that_accept_and_never_answer_time_their_steps_out() -> None:
    """A hung server (or a proxy waiting on one) fails its step after --timeout, with a sentence."""
    with listening() as client, listening() as admin:
        port = client.getsockname()[1]
        started = asyncio.get_running_loop().time()
        done = await doctor(
            "--client-url",
            f"ws://127.0.0.1:{port}/",
            "--admin-url",
            f"http://127.0.0.1:{admin.getsockname()[1]}/",
            "--timeout",
            "1",
            "--json",
        )
        took = asyncio.get_running_loop().time() - started
    assert done.code == 1
    status, upgrade = done.failures()
    assert (status["step"], status["cause"]) == ("status", "no answer within 1 s.")
    assert upgrade["step"] == "upgrade"
    assert upgrade["cause"].startswith("the upgrade request got no answer within 1 s")
    assert f"curl -i http://127.0.0.1:{port}/" in upgrade["fix"]
    assert took < scaled(15)


# -- Node Aphlict ------------------------------------------------------------------------


async def test_node_aphlict_passes_with_the_fastaphlict_only_steps_skipped(tmp_path: Path) -> None:
    ports = free_ports(2)
    node = spawn_node_aphlict(tmp_path / "aphlict.log", ports)
    try:

        async def listens() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", ports[1])
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listens, scaled(10), "Node Aphlict's admin port")
        done = await doctor(
            "--client-url",
            f"ws://127.0.0.1:{ports[0]}/",
            "--admin-url",
            f"http://127.0.0.1:{ports[1]}/",
            "--json",
        )
    finally:
        stop(node)
    assert done.code == 0, done.out + node.log()
    (broker,) = [c for c in done.report["checks"] if c["step"] == "broker"]
    assert broker["ok"] is None and "not fastaphlict" in broker["figure"]
    assert ("client", "replay", True) in done.steps()


# -- admin servers that misbehave -------------------------------------------------------

STATUS = b'{"version": "fake", "clients.active": 0}'

Answer = Callable[[str, str, asyncio.StreamWriter], Awaitable[None]]


async def respond(writer: asyncio.StreamWriter, code: int, body: bytes) -> None:
    head = f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


@contextlib.asynccontextmanager
async def fake_admin(answer: Answer, posted: list[bytes] | None = None) -> AsyncIterator[str]:
    """An HTTP/1.1 admin port on loopback: ``answer(method, path, writer)`` answers each request.

    The bodies of POSTs go to ``posted``.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method, path, _ = head.split(" ", 2)
                length = re.search(r"(?i)content-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                if method == "POST" and posted is not None:
                    posted.append(body)
                await answer(method, path, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


def metrics(page: bytes) -> Answer:
    async def answer(method: str, path: str, writer: asyncio.StreamWriter) -> None:
        await respond(writer, 200, STATUS if path == "/status/" else page)

    return answer


@pytest.mark.parametrize(
    ("page", "ok", "says"),
    [
        (b"fastaphlict_broker_up 1 1700000000000\nfastaphlict_broker_nodes 2 17\n", True, "up, 2"),
        (b"fastaphlict_broker_up\n", None, "no broker"),
        (b"fastaphlict_broker_up x\nfastaphlict_broker_up 0\n", False, "not on its broker"),
    ],
)
async def test_metrics_lines_are_read_leniently(page: bytes, ok: bool | None, says: str) -> None:
    """A timestamp after the value, or a line without one, still gives a report."""
    async with fake_admin(metrics(page)) as admin:
        done = await doctor("--admin-url", admin, "--json")
    assert done.code == (1 if ok is False else 0), done.out + done.err
    (broker,) = [c for c in done.report["checks"] if c["step"] == "broker"]
    assert broker["ok"] is ok
    assert says in (broker["figure"] or broker["cause"])


async def test_an_unexpected_error_in_a_step_is_a_failed_line_not_a_crash() -> None:
    """A 64-character host label makes getaddrinfo raise UnicodeError; the report goes on."""
    label = "a" * 64
    async with fake_admin(metrics(b"")) as admin:
        done = await doctor(
            "--admin-url", admin, "--client-url", f"ws://{label}.example/", "--json"
        )
    assert done.code == 1, done.err
    failed = done.failure("dns")
    assert failed["target"].startswith("client") and "unexpected error" in failed["cause"]
    assert ("admin", "status", True) in done.steps()


async def test_an_admin_that_reaches_no_client_server_names_them_all(tmp_path: Path) -> None:
    """Two client servers missed by one admin: both named, within the step's time limit."""

    async def nobody(method: str, path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/metrics":
            await respond(writer, 404, b"")
        else:
            await respond(writer, 200, STATUS if path == "/status/" else b"")

    async with run(settings()) as node, fake_admin(nobody) as stray:
        port = node.server.client_ports[0]
        servers = [
            {"type": "client", "host": "127.0.0.1", "port": port, "protocol": "http", "path": p}
            for p in ("/a/", "/b/")
        ]
        servers += [
            {
                "type": "admin",
                "host": "127.0.0.1",
                "port": node.server.admin_ports[0],
                "protocol": "http",
            },
            {
                "type": "admin",
                "host": "127.0.0.1",
                "port": int(stray.split(":")[2].strip("/")),
                "protocol": "http",
            },
        ]
        done = await doctor("--servers", servers_file(tmp_path, servers), "--json")
    assert done.code == 1, done.out
    failed = done.failure("cluster")
    assert failed["target"] == f"admin {stray}"
    assert f"did not reach ws://127.0.0.1:{port}/a/, ws://127.0.0.1:{port}/b/" in failed["cause"]
    assert "not one cluster" in failed["cause"]


async def test_an_endless_answer_is_read_no_further_than_64_kib() -> None:
    async def endless(method: str, path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        while True:
            writer.write(b" " * 65536)
            await writer.drain()

    async with fake_admin(endless) as admin:
        done = await doctor("--admin-url", admin, "--json")
    assert done.code == 1, done.out
    failed = done.failure("status")
    assert f"GET {admin}status/ answered with a body over 64 KiB" in failed["cause"]


@pytest.mark.parametrize(("slow", "step"), [("/status/", "status"), ("/", "delivery")])
async def test_an_admin_answer_slower_than_phorges_2_s_fails(slow: str, step: str) -> None:
    """Phorge's PHP waits 2 s for the admin port; an answer after that is lost for Phorge."""

    async def late(method: str, path: str, writer: asyncio.StreamWriter) -> None:
        if path == slow:
            await asyncio.sleep(2.5)
        await respond(
            writer, 404 if path == "/metrics" else 200, STATUS if path == "/status/" else b""
        )

    async with run(settings()) as node, fake_admin(late) as admin:
        done = await doctor("--client-url", node.client_url(), "--admin-url", admin, "--json")
    assert done.code == 1, done.out
    failed = done.failure(step)
    assert "Phorge gives up on admin calls at 2 s" in failed["cause"]


async def test_the_test_post_is_what_phorge_posts() -> None:
    """key, type, subscribers, and the 32 random characters Phorge adds as uniqueID."""
    posted: list[bytes] = []
    async with run(settings()) as node, fake_admin(metrics(b""), posted) as admin:
        # The fake admin delivers nothing: the delivery step waits out a short limit.
        urls = ("--client-url", node.client_url(), "--admin-url", admin)
        await doctor(*urls, "--timeout", f"{scaled(1):g}", "--json")
    message = json.loads(posted[0])
    assert sorted(message) == ["key", "subscribers", "type", "uniqueID"]
    assert re.fullmatch("[a-z2-7]{32}", message["uniqueID"]), message


def test_tcp_goes_on_to_the_next_address_when_one_does_not_answer() -> None:
    """A name with an address that drops SYNs first, as IPv6 without a route: Happy Eyeballs.

    On asyncio's own loop, as ``fastaphlict doctor`` runs (``asyncio.run``).
    """
    silent = socket.socket()
    silent.bind(("127.0.0.2", 0))
    silent.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped, a connect hangs
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(silent.getsockname())
        fillers.append(filler)
    loop = asyncio.SelectorEventLoop()

    async def check() -> str:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        good = server.sockets[0].getsockname()
        infos = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", silent.getsockname()),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", good),
        ]

        async def resolve(*args: object, **kwargs: object) -> list[Any]:
            return infos

        loop.getaddrinfo = resolve  # type: ignore[method-assign]
        try:
            return await network.tcp(Target("admin", "dual.example", good[1], False, "/"), 2.0)
        finally:
            server.close()

    try:
        figure = loop.run_until_complete(check())
    finally:
        loop.close()
        for sock in (silent, *fillers):
            sock.close()
    assert figure.startswith("connected to 127.0.0.1 in"), figure


async def test_an_upgrade_answer_with_endless_headers_is_named() -> None:
    async def huge(method: str, path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nX-Big: " + b"x" * 70000)
        await writer.drain()
        await asyncio.sleep(30)

    async with fake_admin(huge) as url:
        done = await doctor("--client-url", url.replace("http", "ws"), "--json")
    assert done.code == 1, done.out
    failed = done.failure("upgrade")
    assert "over 64 KiB of headers" in failed["cause"]
