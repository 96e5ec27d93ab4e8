"""Rate limits for log lines about rejected input.

Both ports face clients that may be hostile (the client port faces the
internet): a line per refused socket, frame or connection would let one of
them fill a disk. Each kind of line gets a budget per window instead.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Throttle"]

log = logging.getLogger("fastaphlict")


class Throttle:
    """At most ``limit`` log lines per ``window`` seconds for one kind of rejected input.

    A hostile client opening socket after socket can't fill the disk; the
    first line allowed after a window that suppressed some says how many.
    """

    __slots__ = ("_count", "_log", "_start", "_suppressed", "kind", "limit", "window")

    def __init__(
        self,
        kind: str,
        limit: int = 20,
        window: float = 60.0,
        logger: logging.Logger | logging.LoggerAdapter = log,  # type: ignore[type-arg]
    ) -> None:
        self.kind = kind
        self._log = logger
        self.limit = limit
        self.window = window
        self._start = -window
        self._count = 0
        self._suppressed = 0

    def allow(self) -> bool:
        """Whether to log this line; counts it as suppressed otherwise."""
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                self._log.info(
                    "suppressed %d similar line(s) (%s) in the last %.0fs",
                    self._suppressed,
                    self.kind,
                    now - self._start,
                )
            self._start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self.limit:
            self._count += 1
            return True
        self._suppressed += 1
        return False
