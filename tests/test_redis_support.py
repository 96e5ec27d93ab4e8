"""The Redis test helpers do what the broker's tests will rely on, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import redis_support
from redis_support import (
    RedisReplyError,
    RedisServer,
    RedisStartError,
    RespClient,
    StallProxy,
    _Incomplete,
    encode_command,
    parse_reply,
)
from support import TIMEOUT, eventually, scaled

#: How long a test waits to see that nothing comes (a paused server, a stalled proxy).
SILENCE = scaled(0.3)


# -- RESP, without a server ---------------------------------------------------------


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command("SET", b"k\r\n", 7, "é") == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n$2\r\n\xc3\xa9\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"+OK\r\n", "OK"),
        (b":-42\r\n", -42),
        (b"$5\r\na\r\nbc\r\n", b"a\r\nbc"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n", [b"1-0", [b"f", b"v"]]),
    ],
)
def test_replies_parse(raw: bytes, value: object) -> None:
    assert parse_reply(raw + b"+next\r\n") == (value, len(raw))


def test_an_error_reply_is_an_exception_value() -> None:
    error, used = parse_reply(b"-NOAUTH Authentication required.\r\n")
    assert isinstance(error, RedisReplyError) and str(error).startswith("NOAUTH")
    assert used == 34


@pytest.mark.parametrize("raw", [b"", b"+OK", b"$5\r\nabc", b"*2\r\n:1\r\n", b"$3\r\nabc\r"])
def test_a_partial_reply_consumes_nothing(raw: bytes) -> None:
    with pytest.raises(_Incomplete):
        parse_reply(raw)


# -- RedisServer --------------------------------------------------------------------


def test_it_answers_ping_on_its_port_and_url(redis_server: RedisServer) -> None:
    assert redis_server.command("PING") == "PONG"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.command("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"always"]
    assert redis_server.command("CONFIG", "GET", "save") == [b"save", b""]
    assert redis_server.command("CONFIG", "GET", "bind") == [b"bind", b"127.0.0.1"]
    assert redis_server.log_path.read_text().strip(), "it logs to its directory"


def test_commands_the_broker_tests_need(redis_server: RedisServer) -> None:
    cmd = redis_server.command
    first = cmd("XADD", "s", "*", "f", "v1")
    cmd("XADD", "s", "*", "f", "v2")
    assert cmd("XLEN", "s") == 2
    assert cmd("XRANGE", "s", "-", "+", "COUNT", 1) == [[first, [b"f", b"v1"]]]
    assert cmd("KEYS", "*") == [b"s"]
    assert cmd("DBSIZE") == 1
    assert cmd("GET", "missing") is None
    assert cmd("FLUSHALL") == "OK"
    assert cmd("DBSIZE") == 0
    with pytest.raises(RedisReplyError, match=r"^ERR wrong number of arguments"):
        cmd("XADD", "s", "*")  # wrong number of arguments


def test_client_kill_closes_the_killed_connection(redis_server: RedisServer) -> None:
    with redis_server.client() as victim:
        victim.command("CLIENT", "SETNAME", "victim")
        killed = redis_server.command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
        assert killed == 1
        with pytest.raises(ConnectionError):
            victim.command("PING")


def test_client_pause_holds_writes_until_unpause(redis_server: RedisServer) -> None:
    assert redis_server.command("CLIENT", "PAUSE", round(scaled(10) * 1000), "WRITE") == "OK"
    with redis_server.client() as writer:
        writer.send("SET", "k", "v")
        with pytest.raises(TimeoutError):
            writer.read_reply(SILENCE)
        assert redis_server.command("CLIENT", "UNPAUSE") == "OK"
        assert writer.read_reply() == "OK"  # the held reply, on the same connection
    assert redis_server.command("GET", "k") == b"v"


def test_data_survives_stop_and_start_on_the_same_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    for i in range(3):
        redis_server.command("XADD", "stream", "*", "n", i)
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(ConnectionRefusedError):
        redis_server.command("PING")
    redis_server.start()
    assert (redis_server.port, redis_server.running) == (port, True)
    assert redis_server.pid != pid
    assert redis_server.command("XLEN", "stream") == 3
    assert (redis_server.directory / "appendonlydir").is_dir()


def test_acknowledged_writes_survive_a_kill(redis_server: RedisServer) -> None:
    redis_server.command("SET", "k", "before the crash")
    redis_server.kill()
    assert not redis_server.running
    redis_server.start()
    assert redis_server.command("GET", "k") == b"before the crash"


def test_pause_silences_it_and_resume_recovers(redis_server: RedisServer) -> None:
    redis_server.pause()
    try:
        with pytest.raises(TimeoutError):
            redis_server.command("PING", timeout=SILENCE)
        with redis_server.client() as held:  # connects still succeed: the kernel accepts
            held.send("PING")
            with pytest.raises(TimeoutError):
                held.read_reply(SILENCE)
            redis_server.resume()
            assert held.read_reply() == "PONG"
    finally:
        redis_server.resume()
    assert redis_server.command("PING") == "PONG"


def test_a_paused_server_still_stops(redis_server: RedisServer) -> None:
    redis_server.pause()
    redis_server.stop(within=scaled(5))
    assert not redis_server.running


def test_the_password_is_required_when_set(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret/:@") as server:
        assert server.url == f"redis://:s3cret%2F%3A%40@127.0.0.1:{server.port}/0"
        assert server.command("PING") == "PONG"
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            server.command("PING", auth=False)
        with pytest.raises(RedisReplyError, match=r"^WRONGPASS"):
            RespClient(("127.0.0.1", server.port), password="wrong")
        server.stop()
        server.start()  # the readiness check authenticates too
        assert server.command("DBSIZE") == 0


def test_a_unix_socket_when_asked(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="redis-") as short:  # tmp_path may be too long
        path = Path(short) / "redis.sock"
        with RedisServer(tmp_path, unixsocket=path, password="pw") as server:
            assert server.unix_url == f"unix://:pw@{path}?db=0"
            with RespClient(path, password="pw") as client:
                assert client.command("PING") == "PONG"


async def test_the_broker_client_reads_the_urls(tmp_path: Path) -> None:
    """The URLs are the broker's configuration: its client must take them as they are."""
    from fastaphlict import resp
    from fastaphlict.config import parse_broker_url

    with tempfile.TemporaryDirectory(prefix="redis-") as short:
        path = Path(short) / "redis.sock"
        with RedisServer(tmp_path, unixsocket=path, password="s3cret/:@") as server:
            for url in (server.url, server.unix_url):
                conn = await resp.connect(parse_broker_url(url), timeout=TIMEOUT)
                try:
                    assert await conn.execute(("PING",), TIMEOUT) == b"PONG"
                finally:
                    conn.close()


def test_a_unix_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        RedisServer(tmp_path, unixsocket=tmp_path / ("x" * 110))


def test_a_server_that_exits_fails_start_with_its_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=["--no-such-directive", "1"])
    with pytest.raises(RedisStartError, match=r"exited with 1:\n(.|\n)*no-such-directive"):
        server.start()
    assert not server.running


def test_a_taken_port_fails_start_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RedisStartError, match="Address already in use"):
            server.start()


def test_a_server_that_never_answers_is_killed_and_reported(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    server.stop()
    server.executable = "/bin/sleep"  # starts, never listens

    def sleeping() -> list[str]:
        return ["/bin/sleep", "60"]

    server.command_line = sleeping  # type: ignore[method-assign]
    with pytest.raises(RedisStartError, match="did not answer PING within"):
        server.start(within=scaled(0.5))
    assert not server.running


def test_no_server_outlives_its_python(tmp_path: Path) -> None:
    """A pytest killed with SIGKILL takes its servers with it (``PR_SET_PDEATHSIG``)."""
    code = (
        "import sys; from pathlib import Path; from redis_support import RedisServer\n"
        f"s = RedisServer(Path({str(tmp_path)!r})).start()\n"
        "print(s.pid, flush=True); sys.stdin.read()\n"
    )
    tests = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(TIMEOUT)
        deadline = time.monotonic() + scaled(5.0)
        while _alive(pid):
            assert time.monotonic() < deadline, f"redis-server {pid} outlived its parent"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait(TIMEOUT)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, already dead, is waiting for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# -- StallProxy ---------------------------------------------------------------------


async def test_the_proxy_forwards(redis_server: RedisServer) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        assert proxy.port != redis_server.port
        with await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port)) as client:
            assert await asyncio.to_thread(client.command, "SET", "k", b"x" * 300_000) == "OK"
            assert await asyncio.to_thread(client.command, "GET", "k") == b"x" * 300_000
            assert proxy.connections == 1


async def test_a_stall_holds_the_reply_and_unstall_delivers_it(
    redis_server: RedisServer,
) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        client = await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port))
        try:
            assert await asyncio.to_thread(client.command, "PING") == "PONG"
            proxy.stall()
            assert proxy.stalled
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(client.command, "INCR", "n", timeout=SILENCE)
            assert redis_server.command("GET", "n") is None, "the command was held, not sent"
            assert proxy.connections == 1, "nothing was closed"
            proxy.unstall()
            assert await asyncio.to_thread(client.read_reply) == 1  # held, then delivered
            assert await asyncio.to_thread(client.command, "INCR", "n") == 2
        finally:
            client.close()


async def test_a_reply_is_held_too(redis_server: RedisServer) -> None:
    """Stalled between the command reaching Redis and the reply coming back."""
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        client = await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port))
        try:
            assert await asyncio.to_thread(client.command, "PING") == "PONG"
            redis_server.pause()  # the command waits in Redis's socket...
            try:
                client.send("INCR", "n")
                await asyncio.sleep(SILENCE)  # ...after the proxy passed it on
                proxy.stall()
            finally:
                redis_server.resume()
            await eventually(lambda: redis_server.command("GET", "n") == b"1", what="INCR ran")
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(client.read_reply, SILENCE)
            proxy.unstall()
            assert await asyncio.to_thread(client.read_reply) == 1
        finally:
            client.close()


async def test_a_connection_made_while_stalled_connects_on_unstall(
    redis_server: RedisServer,
) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        proxy.stall()
        client = await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port))
        try:
            await eventually(lambda: proxy.accepted == 1, what="the proxy accepted")
            assert proxy.connections == 0
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(client.command, "PING", timeout=SILENCE)
            proxy.unstall()
            assert await asyncio.to_thread(client.read_reply) == "PONG"
        finally:
            client.close()


async def test_cut_resets_every_connection_and_the_proxy_stays_up(
    redis_server: RedisServer,
) -> None:
    async with StallProxy("127.0.0.1", redis_server.port) as proxy:
        clients = [await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port)) for _ in range(2)]
        try:
            for client in clients:
                assert await asyncio.to_thread(client.command, "CLIENT", "SETNAME", "c") == "OK"
            assert proxy.connections == 2
            proxy.stall()  # a cut stalled connection is reset all the same
            proxy.cut()
            for client in clients:
                with pytest.raises(ConnectionError):
                    await asyncio.to_thread(client.command, "PING", timeout=TIMEOUT)
            await eventually(lambda: proxy.connections == 0, what="both sides closed")

            def named() -> int:
                listed = redis_server.command("CLIENT", "LIST")
                return listed.count(b" name=c ")

            await eventually(lambda: named() == 0, what="Redis saw the cut")
            proxy.unstall()
            with await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port)) as again:
                assert await asyncio.to_thread(again.command, "PING") == "PONG"
        finally:
            for client in clients:
                client.close()


async def test_close_stops_listening_and_closes_connections(redis_server: RedisServer) -> None:
    proxy = await StallProxy("127.0.0.1", redis_server.port).start()
    client = await asyncio.to_thread(RespClient, ("127.0.0.1", proxy.port))
    try:
        assert await asyncio.to_thread(client.command, "PING") == "PONG"
        port = proxy.port
        await proxy.close()
        with pytest.raises(ConnectionError):
            await asyncio.to_thread(client.command, "PING")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)]
)
def test_without_redis_server_a_test_skips_or_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(redis_support, "REDIS_SERVER", None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="redis-server is not installed"):
        RedisServer(tmp_path)
