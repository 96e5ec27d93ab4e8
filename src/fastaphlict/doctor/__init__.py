"""``fastaphlict doctor``: walk the whole path a browser and Phorge use, and say what breaks.

Phorge's own check of a client server sends one plain HTTP request and
expects 501; it never opens a WebSocket, so a proxy that drops ``Upgrade``,
an unmapped path, a refused certificate or Origin, a proxy timeout that cuts
quiet sockets, or a node off its broker all pass it. The doctor reads
``notification.servers`` as Phorge does and checks each server in order
(``checks``), then prints one line per step (``report``).

Modules: ``targets`` (the setting read into URLs, pure), ``meanings`` (what
an answer means and the fix, pure), ``network`` (dns, tcp, tls),
``handshake`` (the upgrade by hand), ``session`` (an open socket),
``checks`` (the chains of steps), ``report`` (text and JSON, pure). Exit
status: 0 when every check passed, 1 when one failed, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from fastaphlict.doctor.checks import Options, diagnose
from fastaphlict.doctor.report import as_json, as_text, passed
from fastaphlict.doctor.targets import Target, TargetError, from_servers, from_urls

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastaphlict doctor",
        description="Check every step between Phorge, the browsers and the notification "
        "servers: DNS, TCP, TLS, the WebSocket upgrade, Origin, subscribe, a delivery, "
        "replay, idle sockets, the broker.",
    )
    parser.add_argument(
        "--servers",
        metavar="FILE",
        help="Phorge's notification.servers as JSON ('-' for stdin): the list, or what "
        "'bin/config get notification.servers' prints",
    )
    parser.add_argument(
        "--client-url", help="instead of --servers: e.g. wss://phorge.example.com/ws/"
    )
    parser.add_argument("--admin-url", help="instead of --servers: e.g. http://127.0.0.1:22281/")
    parser.add_argument("--origin", help="the Origin browsers send: Phorge's base URI")
    parser.add_argument("--ca-file", metavar="PATH", help="trust this CA instead of the system's")
    parser.add_argument("--instance", metavar="NAME", help="Phorge's cluster.instance, if set")
    parser.add_argument(
        "--idle",
        metavar="SECONDS",
        type=float,
        help="hold a socket idle this long: does something in the path cut it?",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=5.0, help="per step (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _targets(args: argparse.Namespace) -> list[Target]:
    if args.servers is not None:
        if args.client_url or args.admin_url:
            raise TargetError("give --servers or the URLs, not both")
        try:
            if args.servers == "-":
                text = sys.stdin.read()
            else:
                with open(args.servers, encoding="utf-8") as file:
                    text = file.read()
        except OSError as exc:
            raise TargetError(f"cannot read {args.servers}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TargetError(f"{args.servers} is not JSON: {exc}") from exc
        return from_servers(data, args.instance)
    return from_urls(args.client_url, args.admin_url, args.instance)


def main(argv: Sequence[str]) -> int:
    """Run the doctor with ``argv`` (what follows ``doctor``); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.timeout <= 0 or (args.idle is not None and args.idle <= 0):
        parser.print_usage(sys.stderr)
        print("fastaphlict doctor: --timeout and --idle must be positive", file=sys.stderr)
        return 2
    try:
        targets = _targets(args)
    except TargetError as exc:
        print(f"fastaphlict doctor: {exc}", file=sys.stderr)
        return 2
    options = Options(args.origin, args.ca_file, args.timeout, args.idle)
    try:
        checks = asyncio.run(diagnose(targets, options))
    except (OSError, ValueError) as exc:  # an unreadable --ca-file, say
        print(f"fastaphlict doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(checks), ensure_ascii=False, indent=2))
    else:
        print(as_text(checks), end="")
    return 0 if passed(checks) else 1
