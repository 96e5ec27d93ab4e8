"""End-to-end scenarios: a real server process, real sockets, the plain-send floor beside it.

Each test starts a fresh server (see ``conftest.server``), runs one scenario of
:mod:`fastaphlict.bench` against it, and, in the same test, the floor: plain
Python ``send()`` of the same frame to the same sockets. The figures that
matter are ratios measured side by side in one run (absolute times drift on
a shared machine); they go into ``extra_info`` and the summary table.

pytest-benchmark's own timing is one round of the whole scenario and means
little; ``benchmark.pedantic`` is used so ``--benchmark-only`` selects these
tests and ``--benchmark-disable`` still runs them once.

The only assertions are about correctness: every expected delivery arrived,
once, and nothing else did. Speed targets are printed, not asserted.

Run: ``python -m pytest benchmarks/ --benchmark-only`` (full, a few minutes);
``FASTAPHLICT_BENCH_QUICK=1 python -m pytest benchmarks/ --benchmark-disable``
(quick, well under a minute).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from fastaphlict.bench import Options, Result, raise_nofile_limit, run
from support import (
    ServerProcess,
    free_ports,
    log_problems,
    spawn_floor,
    spawn_node_aphlict,
    wait_listening,
)

QUICK = os.environ.get("FASTAPHLICT_BENCH_QUICK", "").lower() not in ("", "0", "false", "no")

pytestmark = pytest.mark.timeout(300)

#: Full-run sizes, and quick-mode sizes: a second or two per scenario.
SOCKETS = 200 if QUICK else 10_000
TARGETED_MESSAGES = 100 if QUICK else 4_000
BROADCAST_MESSAGES = 20 if QUICK else 200
BURST_SOCKETS = 100 if QUICK else 1_000
BURST_MESSAGES = 100 if QUICK else 2_000
BURST_CONCURRENCY = 16 if QUICK else 64
SCALING = (100, 200, 300) if QUICK else (1_000, 5_000, 15_000)
LATENCY_RATE = 200.0 if QUICK else 500.0
LATENCY_MESSAGES = 200 if QUICK else 2_500
#: Tabs reconnecting at once, and the history they replay (issue 8's sizes).
STORM_TABS = 200 if QUICK else 4_000
STORM_HISTORY = 100 if QUICK else 1_000
#: CPU is read around each slice of messages and the medians reported, so a
#: noisy neighbour spoils one window rather than the figure.
WINDOWS = 2 if QUICK else 5


def _scenario(
    benchmark: Any, server: ServerProcess, record: Any, name: str, **options: Any
) -> Result:
    """Run one scenario through pytest-benchmark, record its figures, check it lost nothing."""
    settings: dict[str, Any] = {"windows": WINDOWS, **options}
    opts = Options(
        client_url=f"{server.client_url}/",
        admin_url=f"{server.admin_url}/",
        server_pid=server.pid,
        **settings,
    )
    results: list[Result] = []
    benchmark.pedantic(lambda: results.append(run(opts)), rounds=1, iterations=1)
    (result,) = results
    row = {"name": name, **result.as_dict(), "server_log_problems": log_problems(server)[:5]}
    benchmark.extra_info.update(row)
    record(row)
    assert result.post_errors == 0, result.first_post_error
    assert result.loss == 0, f"{result.loss} of {result.deliveries_expected} deliveries lost"
    assert result.duplicates == 0
    assert result.unexpected == 0
    assert result.foreign_frames == 0
    assert not result.floor_loss_bytes, "the floor's receivers missed bytes"
    return result


def test_targeted(benchmark: Any, server: ServerProcess, record: Any) -> None:
    """Each tab on its user and 5 of N/5 objects; each message names 20 users and 1 object."""
    result = _scenario(
        benchmark,
        server,
        record,
        "targeted",
        scenario="targeted",
        sockets=SOCKETS,
        messages=TARGETED_MESSAGES,
    )
    assert result.ratio_to_floor is not None


def test_broadcast(benchmark: Any, server: ServerProcess, record: Any) -> None:
    """Every tab on one PHID: each message goes to all sockets, one post at a time."""
    _scenario(
        benchmark,
        server,
        record,
        "broadcast",
        scenario="broadcast",
        sockets=SOCKETS,
        messages=BROADCAST_MESSAGES,
    )


def test_burst(benchmark: Any, server: ServerProcess, record: Any) -> None:
    """Many messages posted concurrently to the same sockets."""
    _scenario(
        benchmark,
        server,
        record,
        "burst",
        scenario="burst",
        sockets=BURST_SOCKETS,
        messages=BURST_MESSAGES,
        concurrency=BURST_CONCURRENCY,
    )


@pytest.mark.parametrize("sockets", SCALING)
def test_scaling(benchmark: Any, server: ServerProcess, record: Any, sockets: int) -> None:
    """The targeted mix at growing socket counts, same messages: CPU per message should stay flat.

    The object count grows with the sockets (one per 5 sockets), so a message
    reaches ~45 sockets at every size; only the number of idle sockets grows.
    """
    _scenario(
        benchmark,
        server,
        record,
        f"scaling-{sockets}",
        scenario="targeted",
        sockets=sockets,
        messages=TARGETED_MESSAGES,
    )


def test_latency(benchmark: Any, server: ServerProcess, record: Any) -> None:
    """The targeted mix at a steady rate: publish-to-receive latency without saturation."""
    result = _scenario(
        benchmark,
        server,
        record,
        "latency",
        scenario="targeted",
        sockets=SOCKETS,
        messages=LATENCY_MESSAGES,
        rate=LATENCY_RATE,
        floor=False,
    )
    assert result.latency_p99_ms is not None


def test_idle_memory(benchmark: Any, server: ServerProcess, record: Any) -> None:
    """Server RSS growth per connected, subscribed, idle tab."""
    result = _scenario(
        benchmark, server, record, "idle", scenario="idle", sockets=SOCKETS, messages=0
    )
    assert result.bytes_per_socket is not None


@pytest.mark.parametrize("history", [STORM_HISTORY, 0], ids=["full", "empty"])
def test_storm(benchmark: Any, server: ServerProcess, record: Any, history: int) -> None:
    """A node restart: every tab reconnects at once with subscribe, replay and ping.

    ``full`` first posts a busy minute of history (each message naming 21
    PHIDs), so each tab is replayed the messages naming its PHIDs; ``empty``
    measures the connection path alone. The replays are checked exactly;
    CPU per tab and the watcher tab's worst ping are printed, not asserted.
    """
    result = _scenario(
        benchmark,
        server,
        record,
        f"storm-{'full' if history else 'empty'}",
        scenario="storm",
        sockets=STORM_TABS,
        history=history,
    )
    assert result.replay_tabs_wrong == 0
    assert result.out_of_order == 0
    assert result.replay_frames_received == result.replay_frames_expected


# -- fastaphlict beside the floors written for issue 19, in one test each ---------


def _floor_scenario(floor: ServerProcess, record: Any, name: str, **options: Any) -> Result:
    """The same scenario against a floor server; it must lose nothing either."""
    opts = Options(
        client_url=f"{floor.client_url}/",
        admin_url=f"{floor.admin_url}/",
        server_pid=floor.pid,
        **{"windows": WINDOWS, "floor": False, **options},
    )
    result = run(opts)
    record({"name": name, **result.as_dict()})
    assert result.post_errors == 0, result.first_post_error
    assert result.loss == 0, f"{name}: {result.loss} of {result.deliveries_expected} lost"
    assert result.duplicates == 0 and result.unexpected == 0
    return result


def _beside(benchmark: Any, record: Any, name: str, ours: Result, theirs: Result, key: str) -> None:
    """Ours over the floor's ``key``: a row of the table and ``extra_info`` (never asserted)."""
    a, b = getattr(ours, key), getattr(theirs, key)
    ratio = a / b if a and b else None
    benchmark.extra_info["ratio_to_own_floor"] = ratio
    benchmark.extra_info[f"floor_{key}"] = b
    record({"name": name, "ratio_to_own_floor": ratio})


def test_targeted_beside_the_minimal_server(
    benchmark: Any, server: ServerProcess, record: Any, tmp_path: Any
) -> None:
    """Goal 1's figure: CPU per delivery over the minimal server's, same mix, same run."""
    mix: dict[str, Any] = {"scenario": "targeted", "sockets": SOCKETS}
    ours = _scenario(
        benchmark,
        server,
        record,
        "targeted-vs-minimal",
        messages=TARGETED_MESSAGES,
        floor=False,
        **mix,
    )
    with spawn_floor(tmp_path / "minimal.log", "minimal") as minimal:
        theirs = _floor_scenario(minimal, record, "minimal", messages=TARGETED_MESSAGES, **mix)
    _beside(benchmark, record, "targeted/minimal", ours, theirs, "server_cpu_per_delivery_us")


def test_empty_storm_beside_the_bare_protocol(
    benchmark: Any, server: ServerProcess, record: Any, tmp_path: Any
) -> None:
    """Goal 3's figure: CPU per tab of an empty-history storm over the bare protocol's."""
    mix: dict[str, Any] = {"scenario": "storm", "sockets": STORM_TABS, "history": 0}
    ours = _scenario(benchmark, server, record, "storm-empty-vs-bare", **mix)
    with spawn_floor(tmp_path / "bare.log", "bare") as bare:
        theirs = _floor_scenario(bare, record, "bare", **mix)
    _beside(benchmark, record, "storm-empty/bare", ours, theirs, "server_cpu_per_tab_us")


def test_full_storm_beside_node_aphlict(
    benchmark: Any, server: ServerProcess, record: Any, tmp_path: Any
) -> None:
    """Goal 3's second figure: CPU per tab of a full-history storm over Node Aphlict's.

    Runs where ``FASTAPHLICT_NODE_APHLICT`` names Phorge's ``aphlict_server.js``
    (skipped otherwise, as the tests that need it are); Node Aphlict gets the
    same storm right after fastaphlict, each on a fresh process.
    """
    mix: dict[str, Any] = {"scenario": "storm", "sockets": STORM_TABS, "history": STORM_HISTORY}
    raise_nofile_limit()  # Node Aphlict inherits it: one descriptor per tab
    with spawn_node_aphlict(tmp_path / "node.log", free_ports(2)) as node:
        wait_listening(node, "Node Aphlict")
        ours = _scenario(benchmark, server, record, "storm-full-vs-node", **mix)
        theirs = _floor_scenario(node, record, "node-aphlict", **mix)
    assert theirs.replay_tabs_wrong == 0 and ours.replay_tabs_wrong == 0
    _beside(benchmark, record, "storm-full/node", ours, theirs, "server_cpu_per_tab_us")
