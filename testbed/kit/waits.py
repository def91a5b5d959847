"""Bounded waits: every wait of the testbed ends, with the last value it saw."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(fn: Callable[[], T], timeout: float, every: float = 0.25) -> T:
    """Call `fn` every `every` seconds until it returns a true value or `timeout` seconds have
    passed; returns its last value (false when the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
