"""The memory this machine can still give a process without swapping: Linux's MemAvailable."""

from __future__ import annotations

from pathlib import Path


def available_bytes() -> int | None:
    """Linux's estimate of the memory a new allocation can take without swapping (MemAvailable), or None
    where /proc/meminfo does not say."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)
