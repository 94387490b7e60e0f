"""Waiting for a quiet machine before measuring: these machines are shared, and another job's load skews timings
and memory alike. Every benchmark's --wait-quiet uses this."""

from __future__ import annotations

import os
import time
from typing import Callable


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_quiet(limit: float, poll: float = 15.0, log: Callable[[str], None] | None = None) -> float:
    """Wait up to `limit` seconds for the 1-minute load average to fall below 1; return the load average then."""
    deadline = time.monotonic() + limit
    while load() >= 1.0 and time.monotonic() < deadline:
        if log:
            log(f"  waiting for a quiet machine (load {load():.2f})")
        time.sleep(poll)
    return load()
