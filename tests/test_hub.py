"""Hub and history rules (spec §1 status, §4 history, §5 touched), without sockets."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastaphlict
from fastaphlict import hub as hub_module
from fastaphlict.hub import HISTORY_LIMIT, HISTORY_TTL_MS, History, Hub
from fastaphlict.protocol import loads


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
