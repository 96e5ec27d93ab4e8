"""What the doctor says: one line per step, or the same as JSON for scripts.

Pure: the checks in, text or a JSON-able object out. A line reads like
``systemctl status``: a mark (check: passed, cross: failed, dash: skipped), the server,
the step, its figure, and for a failure one sentence of cause and the fix
to try.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STEPS", "Check", "as_json", "as_text", "passed"]

#: Every step name, in the order the checks run (scripts and tests rely on them).
STEPS = (
    "dns",
    "tcp",
    "tls",
    "upgrade",
    "origin",
    "subscribe",
    "delivery",
    "replay",
    "idle",
    "status",
    "broker",
    "cluster",
)

#: ✓ passed, ✗ failed, an en dash for skipped.
MARKS = {True: "\u2713", False: "\u2717", None: "\u2013"}


@dataclass(frozen=True)
class Check:
    """One step's outcome: ``ok`` is None when skipped (``figure`` then says why)."""

    target: str
    step: str
    ok: bool | None
    figure: str | None = None
    cause: str | None = None
    fix: str | None = None

    def __post_init__(self) -> None:
        assert self.step in STEPS, self.step


def passed(checks: Iterable[Check]) -> bool:
    """Whether nothing failed (a skipped step is not a failure)."""
    return all(check.ok is not False for check in checks)


def line(check: Check, width: int = 0) -> str:
    """``✓ admin http://127.0.0.1:22281/  status  200 in 1.2 ms``; a failure adds cause and fix."""
    parts = [MARKS[check.ok], check.target.ljust(width), check.step.ljust(9)]
    if check.figure:
        parts.append(check.figure)
    text = " ".join(parts).rstrip()
    if check.ok is False:
        text += f": {check.cause or 'failed'}"
        if check.fix:
            text += f" Fix: {check.fix}"
    return text


def as_text(checks: Sequence[Check]) -> str:
    """Every check on its line, then a summary line."""
    width = max((len(check.target) for check in checks), default=0)
    lines = [line(check, width) for check in checks]
    failed = sum(check.ok is False for check in checks)
    skipped = sum(check.ok is None for check in checks)
    done = len(checks) - skipped
    summary = f"{failed} of {done} checks failed" if failed else f"all {done} checks passed"
    if skipped:
        summary += f", {skipped} skipped"
    return "\n".join([*lines, summary]) + "\n"


def as_json(checks: Sequence[Check]) -> dict[str, Any]:
    """``{"ok": bool, "checks": [{"target", "step", "ok", "figure", "cause", "fix"}]}``."""
    return {
        "ok": passed(checks),
        "checks": [
            {
                "target": check.target,
                "step": check.step,
                "ok": check.ok,
                "figure": check.figure,
                "cause": check.cause,
                "fix": check.fix,
            }
            for check in checks
        ],
    }
