"""Hub and history rules (spec §1 status, §4 history, §5 touched), without sockets."""

from __future__ import annotations

import ast
import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastaphlict
from fastaphlict import hub as hub_module
from fastaphlict._fanout import build_frame
from fastaphlict.hub import HISTORY_LIMIT, HISTORY_TTL_MS, LATE_MS, History, Hub
from fastaphlict.protocol import dumps, loads
from support import Conn


def test_history_keeps_at_most_the_limit() -> None:
    history = History()
    for n in range(HISTORY_LIMIT + 10):
        history.add(1000.0, [], b"%d" % n)
    assert len(history) == HISTORY_LIMIT
    assert history.since(1000.0, 1)[:1] == [b"10"]


def test_history_purges_by_age_on_write_and_read() -> None:
    history = History()
    history.add(0.0, ["A"], b"old")
    history.add(HISTORY_TTL_MS, ["A"], b"edge")
    assert len(history) == 2, "exactly 60 s old is still held"
    history.add(HISTORY_TTL_MS + 1, ["A"], b"new")
    assert history.since(HISTORY_TTL_MS + 1, HISTORY_TTL_MS) == [
        b"edge",
        b"new",
    ]
    assert history.since(10 * HISTORY_TTL_MS, HISTORY_TTL_MS) == []
    assert len(history) == 0 and history.oldest() is None


def test_history_window_and_negative_age() -> None:
    history = History()
    for at in (100.0, 200.0, 300.0):
        history.add(at, ["A"], b"%d" % at)
    assert history.since(300.0, 100) == [b"200", b"300"]
    assert list(history.since(300.0, -1)) == []


def test_history_indexes_string_subscribers_of_lists_only() -> None:
    history = History()
    history.add(0.0, ["A", 1, None], b"x")
    history.add(0.0, "A", b"y")
    assert history.since(0.0, 1) == [b"x", b"y"]
    assert history.select(["A"], 0.0, 1) == [b"x"], "a non-list reached nobody: replays to nobody"
    assert history.phid_count == 1


def test_publish_appends_fingerprint_to_touched() -> None:
    hub = Hub("FPFPFPFPFPFPFPFP")
    relayed = []

    class Recorder:
        def relay(self, instance: str, message: dict, body: bytes) -> None:
            relayed.append((instance, body, list(message["touched"])))

    hub.add_relay(Recorder())
    message = {"touched": "not a list", "subscribers": []}
    hub.publish("acme", message)
    assert message["touched"] == ["FPFPFPFPFPFPFPFP"]
    instance, body, touched = relayed[0]
    assert instance == "acme"
    assert loads(body) == {"touched": ["FPFPFPFPFPFPFPFP"], "subscribers": []}
    assert touched == ["FPFPFPFPFPFPFPFP"]


def test_loopback_is_not_stored_counted_or_relayed() -> None:
    hub = Hub("ME")
    relayed = []

    class Recorder:
        def relay(self, instance: str, message: dict, body: bytes) -> None:
            relayed.append(body)

    hub.add_relay(Recorder())
    assert hub.publish("default", {"touched": ["X", "ME"], "subscribers": []}) is None
    assert relayed == [] and hub.stats.messages_in == 0
    assert hub.status("default")["history.size"] == 0


def test_status_of_unknown_instance_does_not_create_it() -> None:
    hub = Hub("ME")
    status = hub.status("ghost")
    assert status["clients.total"] == 0 and status["history.age"] is None
    assert hub.instances() == []


def test_status_reads_the_history_as_purged_without_purging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spec §4 purges the history when /status/ reads it: the figures are as if purged, and
    nothing is (expiry is the periodic work's, and a read never writes)."""
    hub = Hub("ME")
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0 - HISTORY_TTL_MS - 1)
    hub.publish("gone", {"subscribers": ["PHID-A"]})
    hub.publish("mixed", {"subscribers": ["PHID-A"]})
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0 - 2_000)
    hub.publish("mixed", {"subscribers": ["PHID-A"]})
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0)
    gone, mixed = hub.status("gone"), hub.status("mixed")
    assert (gone["history.size"], gone["history.age"]) == (0, None)
    assert (mixed["history.size"], mixed["history.age"]) == (1, 2_000)
    assert {inst.name: len(inst.history) for inst in hub.instances()} == {"gone": 1, "mixed": 2}
    assert [(inst.name, size) for inst, size in hub.held()] == [("mixed", 1)]


def test_admin_and_client_never_import_each_other() -> None:
    """The hub is the only thing the two sides share."""
    root = Path(fastaphlict.__file__).parent
    for module, forbidden in (("admin", "client"), ("client", "admin")):
        tree = ast.parse((root / f"{module}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert f"fastaphlict.{forbidden}" not in imported, module


def test_counters_are_written_by_their_owners_only() -> None:
    """Rooms report what they refuse through the owner's API (``hub.reject_post()``,
    ``broker.drop_unsaved()``), never by writing another room's counters: only the hub
    writes ``Stats`` and only the broker's parts write ``BrokerStats``, each through ``self``."""
    root = Path(fastaphlict.__file__).parent
    outside = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "bench":  # the load generator's own tallies
            continue
        owner = rel.parts[0] == "broker" or rel.name == "hub.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            else:
                continue
            for target in targets:
                if not (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr in ("stats", "_stats")
                ):
                    continue
                by_self = (
                    isinstance(target.value.value, ast.Name) and target.value.value.id == "self"
                )
                if not (owner and by_self):
                    outside.append(f"{rel}:{node.lineno}: {ast.unparse(target)}")
    assert outside == []


def test_messages_are_counted_in_one_place() -> None:
    """``messages.in`` and ``messages.out`` are written by the one delivery step alone."""
    tree = ast.parse(Path(hub_module.__file__).read_text())
    writers = set()
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for fn in (node for node in cls.body if isinstance(node, ast.FunctionDef)):
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AugAssign):
                    targets = [node.target]
                if any(
                    isinstance(t, ast.Attribute) and t.attr in ("messages_in", "messages_out")
                    for t in targets
                ):
                    writers.add(f"{cls.name}.{fn.name}")
    assert writers == {"Hub._deliver"}


def test_address_helpers_do_not_pull_the_hub_in() -> None:
    """The rooms that format addresses (socket activation here) import them without the hub."""
    code = (
        "import sys, fastaphlict.address, fastaphlict.systemd;"
        " print(sorted(m for m in sys.modules if m.startswith('fastaphlict.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(done.stdout.strip())
    assert "fastaphlict.address" in loaded and "fastaphlict.hub" not in loaded


def test_history_age_is_never_negative_when_the_clock_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NTP may step the wall clock back: /status/ shows age 0, not a negative age."""
    hub = Hub("ME")
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0)
    hub.publish("default", {"subscribers": []})
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0 - 10_000)
    status = hub.status("default")
    assert status["history.size"] == 1
    assert status["history.age"] == 0
    monkeypatch.setattr(hub_module, "now_ms", lambda: 1_000_000.0 + 2_500)
    assert hub.status("default")["history.age"] == 2_500


# -- messages from other nodes of a broker cluster ---------------------------------

NOW = 1_700_000_000_000.0


class Recorder:
    """A relay that records what it is handed."""

    def __init__(self) -> None:
        self.relayed: list[tuple[str, bytes]] = []

    def relay(self, instance: str, message: dict, body: bytes) -> None:
        self.relayed.append((instance, body))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "now_ms", lambda: NOW)


@pytest.fixture
def tabs(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """Fake sockets: ``tabs(hub, instance, *phids)`` attaches one subscribed to ``phids``."""
    made: list[Conn] = []

    def attach(hub: Hub, instance: str, *phids: str) -> Conn:
        conn = Conn(loop)
        made.append(conn)
        conn.sub = hub.attach(instance, conn.transport)  # type: ignore[attr-defined]
        hub.subscribe(conn.sub, list(phids))  # type: ignore[attr-defined]
        return conn

    yield attach
    for conn in made:
        conn.close()


def payload(key: object, *subscribers: str, touched: tuple[str, ...] = ("ORIGIN",)) -> bytes:
    """A message as another node serialised it (its fingerprint in ``touched``)."""
    return dumps({"key": key, "subscribers": list(subscribers), "touched": list(touched)})


def test_receive_delivers_to_matching_sockets_only(clock: None, tabs: Any) -> None:
    hub = Hub("ME")
    a, b = tabs(hub, "acme", "PHID-A"), tabs(hub, "acme", "PHID-B")
    other = tabs(hub, "default", "PHID-A")
    body = payload(1, "PHID-A")
    assert hub.receive("acme", body, NOW - 5) == 1
    hub.outbox.flush()
    assert a.read() == build_frame(body), "the payload as its first node serialised it"
    assert b.read() == b"" and other.read() == b""
    assert hub.stats.messages_in == 1 and hub.stats.messages_out == 1


def test_receive_keeps_the_acceptance_time_so_ages_count_from_it(clock: None) -> None:
    hub = Hub("ME")
    hub.receive("acme", payload(1, "PHID-A"), NOW - 12_345)
    status = hub.status("acme")
    assert status["history.size"] == 1
    assert status["history.age"] == 12_345
    assert hub.export_state()["acme"][0][0] == NOW - 12_345


def test_a_received_message_replays_like_a_posted_one(clock: None, tabs: Any) -> None:
    hub = Hub("ME")
    hub.receive("acme", payload(1, "PHID-A"), NOW - 30_000)
    hub.receive("acme", payload(2, "PHID-B"), NOW - 20_000)
    tab = tabs(hub, "acme", "PHID-A")
    assert hub.replay("acme", tab.sub, 60_000) == 1
    hub.outbox.flush()
    assert tab.read() == build_frame(payload(1, "PHID-A"))
    assert hub.replay("acme", tab.sub, 29_000) == 0, "older than the asked-for age"


def test_receive_is_never_relayed_nor_touched(clock: None) -> None:
    hub = Hub("ME")
    recorder = Recorder()
    hub.add_relay(recorder)
    body = payload(1, "PHID-A", touched=("ORIGIN", "PEER"))
    hub.receive("default", body, NOW)
    assert recorder.relayed == []
    [(_, _, stored)] = hub.export_state()["default"]
    assert stored == body, "stored byte for byte: our fingerprint is not added"
    hub.publish("default", {"subscribers": []})
    assert len(recorder.relayed) == 1, "posts still are"


def test_receive_of_an_unreadable_payload_stores_it_for_nobody(
    clock: None, tabs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub("ME")
    tab = tabs(hub, "default", "PHID-A")
    with caplog.at_level(logging.WARNING, "fastaphlict.hub"):
        assert hub.receive("default", b"not json", NOW) == 0
    hub.outbox.flush()
    assert tab.read() == b""
    assert hub.status("default")["history.size"] == 1
    assert "unreadable message from another node" in caplog.text


def test_a_message_from_the_broker_is_not_checked_against_max_subscribers(
    clock: None, tabs: Any
) -> None:
    """The node that took the post checked it; every node must hold the same history."""
    hub = Hub("ME", max_subscribers=2)
    tab = tabs(hub, "acme", "PHID-A")
    live, read = payload(1, "PHID-A", "PHID-B", "PHID-C"), payload(2, "PHID-A", "PHID-B", "PHID-C")
    assert hub.receive("acme", live, NOW - 10) == 1
    assert hub.merge("acme", [(NOW - 5, read, True)]) == (1, 1)
    hub.outbox.flush()
    assert tab.read() == build_frame(live) + build_frame(read)
    assert hub.status("acme")["history.size"] == 2


def test_merge_skips_what_the_history_already_holds(clock: None, tabs: Any) -> None:
    hub = Hub("ME")
    known = payload("known", "PHID-A")
    hub.import_state("acme", [(NOW - 3000, ["PHID-A"], known)])
    tab = tabs(hub, "acme", "PHID-A")
    new = payload("new", "PHID-A")
    entries = [(NOW - 3000, known, True), (NOW - 1000, new, True), (NOW - 500, new, True)]
    assert hub.merge("acme", entries) == (1, 1)
    hub.outbox.flush()
    assert tab.read() == build_frame(new), "only the new one, once"
    assert [p for _, _, p in hub.export_state()["acme"]] == [known, new]
    assert hub.stats.messages_in == 1


def test_merge_delivers_only_what_was_accepted_since_deliver_from(clock: None, tabs: Any) -> None:
    hub = Hub("ME")
    tab = tabs(hub, "acme", "PHID-A")
    before, edge, after = (payload(n, "PHID-A") for n in ("before", "edge", "after"))
    entries = [(NOW - 2000, before, True), (NOW - 1000, edge, True), (NOW - 10, after, True)]
    assert hub.merge("acme", entries, deliver_from=NOW - 1000) == (3, 2)
    hub.outbox.flush()
    assert tab.read() == build_frame(edge) + build_frame(after)
    assert hub.stats.messages_out == 2
    assert hub.status("acme")["history.size"] == 3, "every one is in the history"
    assert hub.replay("acme", tab.sub, 60_000) == 3


def test_merge_rebuilds_the_history_ordered_by_acceptance_time(clock: None) -> None:
    hub = Hub("ME")
    hub.receive("acme", payload("mine", "PHID-A"), NOW - 2000)
    entries = [
        (NOW - 500, payload("late", "PHID-A"), True),
        (NOW - 3000, payload("early", "PHID-A"), True),
        (NOW - HISTORY_TTL_MS - 1, payload("expired", "PHID-A"), True),
        (NOW - 1000, payload("middle", "PHID-A"), True),
    ]
    hub.merge("acme", entries)
    saved = hub.export_state()["acme"]
    assert [loads(p)["key"] for _, _, p in saved] == ["early", "mine", "middle", "late"]
    assert [at for at, _, _ in saved] == [NOW - 3000, NOW - 2000, NOW - 1000, NOW - 500]
    assert hub.status("acme")["history.age"] == 3000, "each keeps its true age"


def test_merge_keeps_but_does_not_deliver_this_nodes_own_messages(clock: None, tabs: Any) -> None:
    """Its own: its tabs had them when they were posted, even if its history lost them since."""
    hub = Hub("ME")
    tab = tabs(hub, "acme", "PHID-A")
    own, other = payload("own", "PHID-A"), payload("other", "PHID-A")
    assert hub.merge("acme", [(NOW - 2000, own, False), (NOW - 1000, other, True)]) == (2, 1)
    hub.outbox.flush()
    assert tab.read() == build_frame(other)
    assert [loads(p)["key"] for _, _, p in hub.export_state()["acme"]] == ["own", "other"]


async def test_a_late_message_is_delivered_at_once_and_kept_with_its_age(
    clock: None, tabs: Any
) -> None:
    """Published late (its node was cut off): the history takes it in time order."""
    hub = Hub("ME")
    tab = tabs(hub, "acme", "PHID-A")
    hub.receive("acme", payload("recent", "PHID-A"), NOW - 100)
    hub.receive("acme", payload("late", "PHID-A"), NOW - 50_000)
    hub.outbox.flush()
    assert tab.read() == build_frame(payload("recent", "PHID-A")) + build_frame(
        payload("late", "PHID-A")
    ), "both delivered as they came"
    await asyncio.sleep(0)  # the history settles once the burst is read
    saved = hub.export_state()["acme"]
    assert [loads(p)["key"] for _, _, p in saved] == ["late", "recent"]
    assert hub.status("acme")["history.age"] == 50_000, "its age counts from its acceptance"
    assert hub.replay("acme", tab.sub, 10_000) == 1, "a short replay window leaves it out"


async def test_every_way_in_reaches_the_sockets_through_one_delivery_step(
    clock: None, tabs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Posted, received, received late or merged from Redis: each is delivered, counted and
    traced at debug by the same step."""
    hub = Hub("ME", debug=True)
    tab = tabs(hub, "acme", "PHID-A")
    with caplog.at_level(logging.DEBUG, logger="fastaphlict.hub"):
        hub.publish("acme", {"key": "posted", "subscribers": ["PHID-A"]})
        hub.receive("acme", payload("received", "PHID-A"), NOW)
        hub.receive("acme", payload("late", "PHID-A"), NOW - 50_000)
        assert hub.merge("acme", [(NOW, payload("merged", "PHID-A"), True)]) == (1, 1)
    await asyncio.sleep(0)
    traced = [
        loads(record.getMessage().split(": ", 1)[1])["key"]
        for record in caplog.records
        if record.getMessage().startswith("publish instance=acme to 1 socket(s): ")
    ]
    assert traced == ["posted", "received", "late", "merged"]
    assert (hub.stats.messages_in, hub.stats.messages_out) == (4, 4)
    hub.outbox.flush()
    assert tab.read().count(b'"PHID-A"') == 4


def test_a_message_a_little_late_is_appended_without_a_rebuild(clock: None) -> None:
    """Two nodes accepting posts at once: a rebuild per message would cost 100 times it."""
    hub = Hub("ME")
    hub.receive("acme", payload("first", "PHID-A"), NOW - 100)
    hub.receive("acme", payload("second", "PHID-A"), NOW - 100 - LATE_MS + 1)  # no loop needed
    saved = hub.export_state()["acme"]
    assert [loads(p)["key"] for _, _, p in saved] == ["first", "second"]
    assert [at for at, _, _ in saved] == [NOW - 100, NOW - 100], "it takes the newest's time"


def test_merge_of_nothing_new_leaves_no_empty_instance_behind(clock: None) -> None:
    hub = Hub("ME")
    assert hub.merge("ghost", []) == (0, 0)
    assert hub.instances() == []


def test_a_post_touched_by_a_cluster_member_is_a_loopback(clock: None) -> None:
    """A mesh peer bouncing back a message the broker already brought here."""
    hub = Hub("ME")
    recorder = Recorder()
    hub.add_relay(recorder)
    asked: list[object] = []

    def is_member(fp: str) -> bool:
        asked.append(fp)
        assert isinstance(fp, str), "only strings are asked about"
        return fp == "MEMBER"

    hub.join_cluster(is_member)
    assert (
        hub.publish("default", {"subscribers": [], "touched": [1, None, "PEER", "MEMBER"]}) is None
    )
    assert recorder.relayed == [] and hub.stats.messages_in == 0
    assert hub.status("default")["history.size"] == 0
    assert "MEMBER" in asked
    assert hub.publish("default", {"subscribers": [], "touched": ["PEER", "STRANGER"]}) == 0
    assert len(recorder.relayed) == 1 and hub.status("default")["history.size"] == 1


def test_without_a_cluster_a_touched_stranger_is_no_loopback(clock: None) -> None:
    hub = Hub("ME")
    assert hub.publish("default", {"subscribers": [], "touched": ["MEMBER"]}) == 0
    assert hub.status("default")["history.size"] == 1


@pytest.mark.parametrize("source", ["import", "merge", "receive"])
def test_acceptance_times_from_the_future_are_capped_counted_and_logged(
    clock: None, source: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A skewed node or a state file from the future cannot outlive the window."""
    hub = Hub("ME")
    ahead, near = NOW + 3_600_000, NOW + hub_module.FUTURE_TOLERANCE_MS / 2
    entries = [payload(name, "PHID-A") for name in ("near", "ahead")]
    with caplog.at_level(logging.WARNING, "fastaphlict.hub"):
        if source == "import":
            hub.import_state(
                "acme", [(near, ["PHID-A"], entries[0]), (ahead, ["PHID-A"], entries[1])]
            )
        elif source == "merge":
            hub.merge("acme", [(near, entries[0], True), (ahead, entries[1], True)])
        else:
            hub.receive("acme", entries[0], near)
            hub.receive("acme", entries[1], ahead)
    times = [at for at, _, _ in hub.export_state()["acme"]]
    limit = NOW + hub_module.FUTURE_TOLERANCE_MS
    assert times == [near, limit], "within the tolerance kept, beyond it capped, order kept"
    assert hub.stats.times_capped == 1
    assert "lies 3600000 ms ahead of this clock: capped at now" in caplog.text
    assert hub.accepted_at(float("nan"), "x") == limit, "not a number counts as ahead"
