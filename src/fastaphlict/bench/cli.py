"""The ``fastaphlict-bench`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from fastaphlict.bench.brokered import run_broker
from fastaphlict.bench.model import (
    SCENARIOS,
    STORM_CONNECT_CONCURRENCY,
    STORM_TABS,
    BrokerResult,
    Options,
    Result,
)
from fastaphlict.bench.scenario import run_scenario

# -- command line -------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="fastaphlict-bench",
        description=(
            "Load-test an Aphlict-compatible notification server (Aphlict, fastaphlict): "
            "open N WebSocket tabs, post messages as Phorge does, report throughput, "
            "loss, latency and (with --server-pid) the server's CPU per delivery and memory."
        ),
        epilog=(
            "scenarios: targeted = each tab on its user PHID and 5 object PHIDs, each "
            "message names 20 users and 1 object (~45 deliveries); broadcast = every tab on "
            "one PHID, every message to all; burst = broadcast posted --concurrency at a "
            "time; idle = connect and subscribe only, report server RSS per socket; "
            "storm = post --history messages, then every tab reconnects at once with "
            "subscribe (--phids-per-tab PHIDs), replay and ping, as JX.Aphlict does after a "
            "restart: server CPU per tab, time to the last pong, replays checked exactly, "
            "and a separate watcher tab's worst ping round trip; "
            "broker = starts redis-server (from PATH) and three fastaphlict nodes itself: the "
            "targeted mix with half the tabs on each of two --broker nodes and posts to the "
            "first, alternated window by window with one node without a broker holding every "
            "tab; reports both side by side (--client-url, --admin-url and --server-pid are "
            "not used)."
        ),
    )
    parser.add_argument("--client-url", default=defaults.client_url, help="WebSocket URL")
    parser.add_argument("--admin-url", default=defaults.admin_url, help="admin HTTP URL")
    parser.add_argument("--instance", default=None, help="instance name (?instance= and /~name/)")
    parser.add_argument("--scenario", choices=SCENARIOS, default=defaults.scenario)
    parser.add_argument(
        "--sockets", type=int, default=None, help=f"tabs (default: storm {STORM_TABS}, else 1000)"
    )
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="messages/s; 0 = as fast as possible"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="posts in flight (default: burst 64, paced 32, else 1)",
    )
    parser.add_argument("--users", type=int, default=0, help="distinct users (default: sockets)")
    parser.add_argument(
        "--objects", type=int, default=0, help="distinct object PHIDs (default: sockets / 5)"
    )
    parser.add_argument("--server-pid", type=int, default=None, help="read its CPU and RSS")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain send() of the same frames (default: on)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=defaults.connect_concurrency,
        help=f"handshakes in flight (default: storm {STORM_CONNECT_CONCURRENCY}, else 100)",
    )
    parser.add_argument("--deadline", type=float, default=defaults.deadline)
    parser.add_argument(
        "--windows",
        type=int,
        default=defaults.windows,
        help="measure in this many slices of messages and report medians (default 1)",
    )
    parser.add_argument(
        "--broker-transport",
        choices=("tcp", "unix"),
        default=defaults.broker_transport,
        help="broker: the nodes reach Redis over loopback TCP (default) or its unix socket",
    )
    parser.add_argument(
        "--broker-remote-every",
        type=int,
        default=defaults.broker_remote_every,
        metavar="N",
        help="broker: every N-th tab on node B, the rest on A (default 2: half each;"
        " 1000 leaves B the broker's own work only)",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=defaults.history,
        help="storm: messages posted before the storm (default 1000; 0 = empty history)",
    )
    parser.add_argument(
        "--phids-per-tab",
        type=int,
        default=defaults.phids_per_tab,
        help="storm: PHIDs per tab, its user and the rest objects (default 20)",
    )
    parser.add_argument(
        "--watch-interval",
        type=float,
        default=defaults.watch_interval,
        help="storm: seconds between the watcher tab's pings (default 0.005)",
    )
    parser.add_argument(
        "--ca-file",
        default=None,
        help="CA bundle to verify a wss:// --client-url against (default: the system's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _print_human(result: Result | BrokerResult) -> None:
    for key, value in result.as_dict().items():
        if value is None or value == []:
            continue
        if isinstance(value, dict):  # broker: each set-up's figures under its name
            print(f"{key}:")
            for sub, item in value.items():
                if item is not None and item != []:
                    print(f"  {sub:28} {item}")
            continue
        print(f"{key:28} {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastaphlict-bench`` command; returns 0 for a clean run, 1 otherwise."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.scenario == "broker" and args.server_pid is not None:
            parser.error("--server-pid: the broker scenario measures the servers it starts")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    opts = Options(
        client_url=args.client_url,
        admin_url=args.admin_url,
        instance=args.instance,
        scenario=args.scenario,
        sockets=args.sockets or (STORM_TABS if args.scenario == "storm" else Options().sockets),
        messages=args.messages,
        rate=args.rate,
        concurrency=args.concurrency,
        users=args.users,
        objects=args.objects,
        server_pid=args.server_pid,
        seed=args.seed,
        floor=args.floor,
        connect_concurrency=args.connect_concurrency,
        deadline=args.deadline,
        windows=args.windows,
        history=args.history,
        broker_transport=args.broker_transport,
        broker_remote_every=max(2, args.broker_remote_every),
        phids_per_tab=args.phids_per_tab,
        watch_interval=args.watch_interval,
        ca_file=args.ca_file,
    )
    try:
        result = run(opts)
    except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"fastaphlict-bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(result.as_dict()).decode())
    else:
        _print_human(result)
    return 0 if result.clean else 1


def run(opts: Options, workdir: Path | None = None) -> Result | BrokerResult:
    """:func:`run_scenario` (``broker``: :func:`run_broker`) on a fresh uvloop event loop.

    The sync entry point. Only the ``broker`` scenario returns a
    :class:`BrokerResult` (its two set-ups side by side), and only it uses
    ``workdir`` (where its servers log; a temporary directory by default).
    """
    main = run_broker(opts, workdir) if opts.scenario == "broker" else run_scenario(opts)
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but the generator works without it
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
