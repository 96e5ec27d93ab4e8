"""What the docs tests share: the docs' fenced blocks, found, labelled and made runnable.

``tests/test_docs.py`` checks that every block is run or says why not; the
``test_docs_*.py`` files run the labelled ones against the real programs
(nginx, logrotate, Redis, a cluster). Kept here so that no test module
imports another.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support import require

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
DASHBOARD = REPO / "contrib" / "grafana-dashboard.json"

MARKER = "<!-- docs-test -->"
LABEL = re.compile(r"<!-- docs-test: ([\w -]+) -->")
VENV_BIN = ".venv/bin/"

#: Programs a fresh clone only has inside ``.venv/bin/``.
VENV_PROGRAMS = frozenset(
    {"python", "pip", "pytest", "ruff", "fastaphlict", "fastaphlict-bench", "cibuildwheel"}
)

#: Labels Prometheus adds to every scraped series, not the server's own.
TARGET_LABELS = frozenset({"instance", "job"})


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marked: bool
    commands: tuple[str, ...]
    label: str | None = None  # of a <!-- docs-test: LABEL --> line before it
    text: str = ""  # the body, each line stripped of its indentation

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> Iterator[Block]:
    """Every fenced code block of a markdown file, continuation lines joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        if not stripped.startswith("```"):
            index += 1
            continue
        start, fence = index, stripped[: len(stripped) - len(stripped.lstrip("`"))]
        language = stripped[len(fence) :].strip()
        previous = next(
            (lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), ""
        )
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != fence:
            body.append(lines[index].strip())
            index += 1
        index += 1
        label = LABEL.fullmatch(previous)
        yield Block(
            path,
            start + 1,
            language,
            previous == MARKER,
            tuple(_commands(body)),
            label.group(1) if label else None,
            "".join(line + "\n" for line in body),
        )


def _commands(body: list[str]) -> Iterator[str]:
    """Shell lines with ``\\`` continuations joined; here-document bodies skipped."""
    pending = ""
    heredoc_end = None
    for line in body:
        if heredoc_end is not None:
            if line == heredoc_end:
                heredoc_end = None
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command, pending = pending + line, ""
        if not command or command.startswith("#"):
            continue
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", command)
        if heredoc:
            heredoc_end = heredoc.group(1)
        yield command


def shell_blocks() -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.language in ("sh", "bash")]


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in fenced_blocks(path)]


def labelled(label: str) -> Block:
    """The one block marked ``<!-- docs-test: LABEL -->``, for the test that runs it."""
    found = [block for block in all_blocks() if block.label == label]
    assert len(found) == 1, f"{len(found)} blocks labelled {label!r}, expected one"
    return found[0]


def runnable(command: str) -> str:
    """A documented command with the clone's ``.venv/bin/`` read as this interpreter's."""
    bin_dir = Path(sys.executable).parent
    for program in re.findall(r"\.venv/bin/([\w.-]+)", command):
        assert (bin_dir / program).exists(), f"{program} is not in {bin_dir}"
    return command.replace(VENV_BIN, f"{bin_dir}/")


def require_curl() -> None:
    """Skip a test that runs the docs' ``curl`` lines without curl (fail it under ``CI``)."""
    require(
        shutil.which("curl") is not None,
        "curl is not installed (Debian: apt-get install curl, or sh tests/install-deps.sh)",
        "the docs' curl lines",
    )


CONTRIB = REPO / "contrib"
UNITS = ("fastaphlict.service", "fastaphlict.socket", "fastaphlict@.service")
#: The install path the units name, read as the bin directory running the tests.
INSTALLED = "/opt/fastaphlict/venv/bin/"


def paths_under(config: str, root: Path) -> str:
    """A JSON config's absolute paths under /var, /run and /etc moved under ``root``."""
    return re.sub(r'"/((?:var|run|etc)/[^"]*)"', lambda m: json.dumps(f"{root}/{m[1]}"), config)
