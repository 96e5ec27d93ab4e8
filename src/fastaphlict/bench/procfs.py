"""Readings of another process from ``/proc``: the server's CPU and memory, our file limit."""

from __future__ import annotations

import contextlib
import glob
import os
import resource

# -- /proc readings -----------------------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used so far.

    Prefers the per-thread scheduler run time in ``/proc/PID/task/*/schedstat``
    (nanoseconds: the same clock as the floor's ``time.process_time()``, and
    precise enough for a one-second run); falls back to ``utime + stime`` of
    ``/proc/PID/stat`` in clock ticks when schedstat is missing or empty.
    """
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(path) as f:
                total += int(f.read().split()[0])
    if total:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> tuple[int, int]:
    """``(total, steal)`` clock ticks of the machine's CPUs from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def server_rss_bytes(pid: int) -> int:
    """Resident set size from ``/proc/PID/status`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return it.

    Every socket costs one descriptor and 10000-socket runs exceed the usual
    soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def check_fd_budget(sockets: int) -> None:
    limit = raise_nofile_limit()
    if limit != resource.RLIM_INFINITY and sockets + 200 > limit:
        raise RuntimeError(f"{sockets} sockets need more open files than the limit ({limit})")
