"""The floor: the same frames to as many sockets by plain ``send()``, in a child process."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from fastaphlict.bench.model import FloorResult
from fastaphlict.bench.procfs import check_fd_budget, raise_nofile_limit

# -- the floor ----------------------------------------------------------------


def _floor_worker(
    conn: Connection,
    sockets: int,
    frame: bytes,
    targets: list[list[int]] | None,
    windows: list[tuple[int, int]],
) -> None:
    """The floor process: accept ``sockets`` connections, then send, in plain Python.

    Runs in its own process, like a server, so its CPU time is only its
    sending. Blocking sockets: a full buffer waits (off the CPU) instead of
    failing, and ``send()`` on loopback copies a small frame whole. Each
    window of rounds is timed on its own, as the scenario's windows are.
    """
    raise_nofile_limit()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.settimeout(60)
    conn.send(listener.getsockname()[1])
    socks: list[socket.socket] = []
    try:
        while len(socks) < sockets:
            sock, _ = listener.accept()
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        conn.recv()  # "go": the receivers are in place
        size = len(frame)
        timings = []
        for first, stop in windows:
            if targets is None:
                plan = [socks] * (stop - first)
            else:
                plan = [[socks[i] for i in group] for group in targets[first:stop]]
            sends = 0
            wall0 = time.perf_counter()
            cpu0 = time.process_time()
            for group in plan:
                for sock in group:
                    sent = sock.send(frame)
                    if sent != size:
                        sock.sendall(frame[sent:])
                sends += len(group)
            cpu = time.process_time() - cpu0
            timings.append((sends, cpu, time.perf_counter() - wall0))
        conn.send(timings)
        conn.recv()  # "bye": the receivers have counted every byte
    finally:
        for sock in socks:
            sock.close()
        listener.close()
        conn.close()


class _Sink(asyncio.Protocol):
    """A floor receiver: count bytes, discard them."""

    def __init__(self, counter: list[int], done: asyncio.Event, want: int) -> None:
        self.counter = counter
        self.done = done
        self.want = want

    def data_received(self, data: bytes) -> None:
        self.counter[0] += len(data)
        if self.counter[0] >= self.want:
            self.done.set()


async def recv_from(conn: Connection, proc: Any, timeout: float) -> Any:
    """Receive from the floor process without blocking the event loop."""

    def wait() -> Any:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"the floor process exited (status {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError("the floor process did not answer")
        return conn.recv()

    return await asyncio.get_running_loop().run_in_executor(None, wait)


async def run_floor(
    sockets: int,
    frame: bytes,
    targets: list[list[int]] | None,
    windows: list[tuple[int, int]],
    *,
    connect_concurrency: int = 200,
    timeout: float = 60.0,
) -> FloorResult:
    """Time a plain ``send()`` of ``frame`` to ``targets[r]`` for each round ``r``.

    ``targets=None`` sends every round to all sockets; ``windows`` are the
    ``[first, stop)`` round ranges timed separately (the figure is their
    median). The receivers live in this process (as the tabs do), the sender
    in a fresh one, so the sender's CPU time is that of the sends and of
    nothing else.
    """
    check_fd_budget(sockets)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_floor_worker, args=(child, sockets, frame, targets, windows), daemon=True
    )
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()
    counter = [0]
    if targets is None:
        sends_planned = sum(stop - first for first, stop in windows) * sockets
    else:
        sends_planned = sum(len(targets[r]) for first, stop in windows for r in range(first, stop))
    want = sends_planned * len(frame)
    done = asyncio.Event()
    transports: list[asyncio.BaseTransport] = []
    try:
        port = await recv_from(parent, proc, timeout)
        limit = asyncio.Semaphore(connect_concurrency)

        async def connect() -> None:
            async with limit:
                transport, _ = await loop.create_connection(
                    lambda: _Sink(counter, done, want), "127.0.0.1", port
                )
                transports.append(transport)

        await asyncio.wait_for(asyncio.gather(*(connect() for _ in range(sockets))), timeout)
        parent.send("go")
        timings = await recv_from(parent, proc, timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 10.0)
        parent.send("bye")
        return FloorResult(
            sockets=sockets,
            sends=sum(t[0] for t in timings),
            frame_bytes=len(frame),
            cpu_s=sum(t[1] for t in timings),
            wall_s=sum(t[2] for t in timings),
            bytes_expected=want,
            bytes_received=counter[0],
            window_cpu_per_send_us=[cpu / sends * 1e6 for sends, cpu, _ in timings if sends],
        )
    finally:
        for transport in transports:
            transport.abort()
        parent.close()
        await loop.run_in_executor(None, proc.join, 10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
