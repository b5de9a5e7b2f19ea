"""This machine's load figures for heartbeats, when the daemon supplies none of its own."""

from __future__ import annotations

import os
from pathlib import Path

from transport.messages import Load

_MEMINFO = Path("/proc/meminfo")


def available_memory() -> int:
    """MemAvailable in bytes (Linux), else 0 when unknown."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def system_load() -> Load:
    """Free memory and normalised load average; no queue or session figures."""
    try:
        load_avg = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load_avg = 0.0
    return Load(free_memory=available_memory(), load_avg=load_avg)
