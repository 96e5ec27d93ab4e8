"""What the browser tests share: Debian's headless Chromium under Playwright, and PNGs read back.

Chromium is Debian's ``chromium`` package (``tests/install-deps.sh`` installs
it), driven by Playwright for Python; Playwright's own browser download is never
used. Where ``/usr/bin/chromium`` is missing a test skips, unless ``CI`` is
set: there it fails, so that CI cannot pass without having run it
(``support.require``).

:func:`png_pixels` decodes a screenshot with the standard library alone
(zlib, struct), so a test can tell a drawn page from a blank one without an
imaging library.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import require, scaled

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium phones home at start-up (updates,
# sync, field trials); on a closed network those connections fail slowly.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Generous: Chromium and the server share two loaded cores in CI.
WAIT_MS = round(scaled(15) * 1000)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Debian Chromium under Playwright; skips (fails under CI) when either is absent."""
    require(
        CHROMIUM.exists(),
        f"{CHROMIUM} is missing (Debian: apt-get install chromium)",
        "the browser test",
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (pip install '.[test]')", "the browser test")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=scaled(60) * 1000
        )
        try:
            yield browser
        finally:
            browser.close()


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and not interlace, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, row, previous, channels)
        rows.append(bytes(row))
        previous = row
    return width, height, rows


def _unfilter(kind: int, row: bytearray, up: bytearray, bpp: int) -> None:
    """Undo one row's PNG filter in place (RFC 2083 §6)."""
    if kind == 0:
        return
    if kind == 2:
        for i in range(len(row)):
            row[i] = (row[i] + up[i]) & 0xFF
        return
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + ((left + up[i]) >> 1)) & 0xFF
        elif kind == 4:
            corner = up[i - bpp] if i >= bpp else 0
            p = left + up[i] - corner
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner
            row[i] = (row[i] + pred) & 0xFF
        else:
            raise AssertionError(f"unknown PNG filter {kind}")


def colours(data: bytes) -> Counter[bytes]:
    """How many pixels of a PNG have each colour (RGB, alpha dropped)."""
    width, _, rows = png_pixels(data)
    channels = len(rows[0]) // width
    counts: Counter[bytes] = Counter()
    for row in rows:
        counts.update(row[i : i + 3] for i in range(0, len(row), channels))
    return counts
