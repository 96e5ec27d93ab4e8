"""Hub and history rules (spec §1 status, §4 history, §5 touched), without sockets."""

from __future__ import annotations

import ast
from pathlib import Path

import orjson
import pytest

import fastaphlict
from fastaphlict import hub as hub_module
from fastaphlict.hub import (
    HISTORY_LIMIT,
    HISTORY_TTL_MS,
    MAX_DEPTH,
    History,
    Hub,
    NestingTooDeep,
    dumps,
    loads,
)

#: Depths around every limit in play: MAX_DEPTH and orjson's writer (254),
#: Python's recursion limit (~1000), orjson's reader (1024), and far past them.
DEPTHS = [1, 2, 253, 254, 255, 256, 500, 1000, 1023, 1024, 1025, 5000, 100_000]


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

    hub.relays.append(Recorder())
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

    hub.relays.append(Recorder())
    assert hub.publish("default", {"touched": ["X", "ME"], "subscribers": []}) is None
    assert relayed == [] and hub.messages_in == 0
    assert hub.status("default")["history.size"] == 0


def test_status_of_unknown_instance_does_not_create_it() -> None:
    hub = Hub("ME")
    status = hub.status("ghost")
    assert status["clients.total"] == 0 and status["history.age"] is None
    assert hub.instances() == []


@pytest.mark.parametrize(
    "value",
    [{"a": "é日本"}, {"n": 2**63 - 1}, {"k": [1, 2.5, None, True]}, {"z": 1, "a": 2}],
)
def test_dumps_is_compact_utf8_and_keeps_order(value: dict) -> None:
    out = dumps(value)
    assert b" " not in out
    assert loads(out) == value
    assert list(loads(out)) == list(value)
    assert b"\\u" not in out


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


def _nested_text(depth: int, kind: str, leaf: str = "1") -> str:
    """JSON text ``depth`` containers deep (``[]`` is 1 deep), ``leaf`` innermost."""
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def _nested_value(depth: int, leaf: object = 1) -> list:
    value: object = leaf
    for _ in range(depth):
        value = [value]
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize(
    "form",
    ["bytes", "str", "surrogate", "overflow"],
    ids=["orjson", "str", "fallback-surrogate", "fallback-overflow"],
)
def test_loads_accepts_max_depth_and_refuses_deeper_whichever_parser(
    depth: int, kind: str, form: str
) -> None:
    """One rule for every parser: past MAX_DEPTH is NestingTooDeep, never RecursionError.

    A lone surrogate or a number past a double's range sends the body through
    the standard library instead of orjson; the answer must not change.
    """
    leaf = {"surrogate": '"\\ud800"', "overflow": "1e400"}.get(form, "1")
    text = _nested_text(depth, kind, leaf)
    body: bytes | str = text if form == "str" else text.encode()
    if depth <= MAX_DEPTH:
        value = loads(body)
        assert loads(dumps(value)) == value
    else:
        with pytest.raises(NestingTooDeep):
            loads(body)


def test_nesting_too_deep_is_a_value_error() -> None:
    """Callers that refuse invalid JSON (ValueError) refuse deep JSON with no change."""
    assert issubclass(NestingTooDeep, ValueError)


def test_max_depth_is_what_orjson_writes() -> None:
    """Every value loads() returns takes orjson's fast path out; a new orjson must keep that."""
    orjson.dumps(_nested_value(MAX_DEPTH))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(_nested_value(MAX_DEPTH + 1))
    assert orjson.loads(_nested_text(MAX_DEPTH + 1, "list")), "orjson reads deeper than it writes"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 1000, 5000])
@pytest.mark.parametrize("leaf", [1, "\ud800", 10**30], ids=["plain", "surrogate", "huge-int"])
def test_dumps_refuses_what_loads_refuses(depth: int, leaf: object) -> None:
    """Past MAX_DEPTH dumps() raises NestingTooDeep, never RecursionError nor deep output."""
    with pytest.raises(NestingTooDeep):
        dumps(_nested_value(depth, leaf))


@pytest.mark.parametrize("leaf", [1, "\ud800", 10**30], ids=["plain", "surrogate", "huge-int"])
def test_dumps_writes_max_depth(leaf: object) -> None:
    out = dumps(_nested_value(MAX_DEPTH, leaf))
    assert out.startswith(b"[" * MAX_DEPTH) and out.endswith(b"]" * MAX_DEPTH)


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
