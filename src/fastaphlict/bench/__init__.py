"""Load generator for any Aphlict-compatible notification server (``fastaphlict-bench``).

It plays both of Aphlict's clients at once: N browser tabs holding WebSockets
on the client port, each subscribed the way ``JX.Aphlict`` subscribes (its
user PHID plus the object PHIDs of the page), and Phorge's PHP posting
messages to the admin port (raw JSON under curl's default form content type).
Every message carries ``id`` and ``sent`` (``time.monotonic_ns()`` when the post
was issued); the tabs read them back to count deliveries and time them.

What it reports, and why each figure can be trusted:

- **Loss is exact.** The subscription model is built here, so the set of
  sockets each message must reach is computed before posting; every socket
  records which message ids it saw, and loss, duplicates and unexpected
  deliveries come from comparing the two, not from totals.
- **Subscriptions are in force before the first post.** Each socket sends its
  ``subscribe`` then a ``ping``; Aphlict runs one socket's commands in order,
  so its ``pong`` proves the subscription took effect. No sleeps.
- **Server CPU is the server's.** Given ``--server-pid``, the server's CPU time
  is read from ``/proc`` right before a window's first post and right after
  its last expected delivery arrives, and divided by deliveries and by
  messages. The generator runs in its own process, so none of its work is
  counted. With ``--windows W`` the messages are posted in W slices measured
  separately and the medians reported: on a shared machine a neighbour's
  burst then spoils one window, not the figure.
- **The floor is measured, not assumed.** A helper process accepts the same
  number of loopback TCP connections and sends the same frame bytes to the
  same sockets per message with plain Python ``send()``; its CPU per send is the
  cost of the system calls any server must make. Server CPU per delivery over
  that floor is a ratio that survives a change of machine; absolute times do
  not.

Latency includes the generator's own delay: it posts through aiohttp and reads
every socket in one Python process, so a frame waits while the generator is
busy with another post or socket. It is a fair publish-to-receive figure only
when the generator is far from saturated, which is what the paced
(``--rate``) runs are for; in broadcast and burst runs it mostly measures how
fast one Python process drains 10000 sockets.

The ``storm`` scenario plays a node restart instead: a busy minute of history
is posted first, then every tab reconnects at once and sends what
``JX.Aphlict`` sends (``subscribe``, ``replay``, ``ping``). Each tab's replay
is checked against the model (the messages naming its PHIDs, once, oldest
first, before its pong); the server's CPU is read around the storm; a watcher
tab in a separate process pings throughout, and its worst round trip is how
long the storm left an established tab unanswered. It needs a server with an
empty history (a fresh one); only the protocol is used, so Node Aphlict can be
measured the same way.

The ``broker`` scenario (issue 11) starts its own servers: a ``redis-server``,
two fastaphlict nodes sharing it as a broker, and one node without it. Half the
tabs open on each brokered node and the posts go to the first; the same tabs
and messages go to the single node, window by window in alternation. It
reports deliveries per second, CPU per delivery (both nodes summed, Redis'
apart) and latency (the cluster's, the posting node's own tabs', the other
node's) side by side with the single node's (see
:mod:`fastaphlict.bench.brokered`).

Run ``fastaphlict-bench --help`` for the command line; the pytest scenarios in
``benchmarks/`` call :func:`run_scenario` directly.
"""

from __future__ import annotations

from fastaphlict.bench.brokered import run_broker
from fastaphlict.bench.cli import main, run
from fastaphlict.bench.floor import run_floor
from fastaphlict.bench.model import (
    SCENARIOS,
    BrokerResult,
    FloorResult,
    Model,
    Options,
    Result,
    build_model,
    ws_frame,
)
from fastaphlict.bench.procfs import raise_nofile_limit, server_cpu_seconds, server_rss_bytes
from fastaphlict.bench.scenario import run_scenario
from fastaphlict.bench.storm import run_storm

__all__ = [
    "SCENARIOS",
    "BrokerResult",
    "FloorResult",
    "Model",
    "Options",
    "Result",
    "build_model",
    "main",
    "raise_nofile_limit",
    "run",
    "run_broker",
    "run_floor",
    "run_scenario",
    "run_storm",
    "server_cpu_seconds",
    "server_rss_bytes",
    "ws_frame",
]
