"""Check results: one line per check, a summary line at the end."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator


class CheckFailed(Exception):
    """Raised inside a check to fail it with a message."""


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        print(f"ok    {name}" + (f" ({detail})" if detail else ""), flush=True)

    def fail(self, name: str, detail: str) -> None:
        self.failed.append(name)
        print(f"FAIL  {name}", flush=True)
        for line in detail.rstrip().splitlines():
            print(f"      {line}", flush=True)

    def note(self, message: str) -> None:
        print(f"note  {message}", flush=True)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """Runs the body as one check. The body may append details to the yielded
        list (shown on success) or raise CheckFailed / AssertionError to fail."""
        details: list[str] = []
        try:
            yield details
        except (CheckFailed, AssertionError) as e:
            self.fail(name, str(e) or "assertion failed")
        except Exception as e:  # a bug in a check must fail it, never stop the run
            self.fail(name, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        else:
            self.ok(name, "; ".join(details))

    def expect(self, name: str, problems: list[str], detail: str = "") -> None:
        if problems:
            self.fail(name, "\n".join(problems))
        else:
            self.ok(name, detail)

    def summary(self) -> int:
        print()
        if self.failed:
            print("failed checks:")
            for name in self.failed:
                print(f"  - {name}")
        print(f"deploy: {self.passed} passed, {len(self.failed)} failed")
        sys.stdout.flush()
        return 1 if self.failed else 0
