"""A test script's checks: one line per check (`ok   name` or `FAIL name: detail`), counted, and
the closing 'N passed, N failed'. One tally per process: each test script is a process of its own."""

from __future__ import annotations


class Tally:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok, detail: str = ""):
        """Count and print one check; returns `ok` so a caller can go on only when it held."""
        if ok:
            self.passed += 1
            print(f"ok   {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def summary(self) -> int:
        """Print 'N passed, N failed'; the exit status: 1 on any failure."""
        print(f"{self.passed} passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0


TALLY = Tally()
check = TALLY.check
summary = TALLY.summary
